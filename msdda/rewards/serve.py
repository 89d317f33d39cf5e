"""A reward served over HTTP (``msdda reward serve``): heavy judges in their own process, environment and GPU.

FastAPI answers, uvicorn serves. Two endpoints:

- ``GET /health``: what is served: the reward's ``name`` and ``version`` (what a ``remote:`` reward checks before
  any sampling, and what adapters trained on it record), its ``spec`` and constructor ``kwargs``, the largest
  ``batch_size`` it scores at once, and the ``protocol`` version of msdda.rewards.wire;
- ``POST /score``: a request of msdda.rewards.wire (images and prompts as safetensors bytes), answered with the
  scores. A batch larger than ``batch_size`` is scored in chunks of it; requests are scored one at a time (one
  reward, one device), in the order they arrive. A request that breaks the protocol gets HTTP 400 with what was
  wrong; a reward that raises gets HTTP 500 (and its traceback in the server's log), which clients retry.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from msdda import __version__
from msdda.rewards.base import Reward
from msdda.rewards.wire import CONTENT_TYPE, WireError, decode_request, encode_scores

__all__ = ["reward_app", "serve_reward", "PROTOCOL"]

PROTOCOL = "1"
"""The version of the request and answer format (msdda.rewards.wire) a server speaks."""

logger = logging.getLogger(__name__)


def reward_app(reward: Reward, spec: str, kwargs: dict[str, Any], batch_size: int) -> FastAPI:
    """The FastAPI app serving ``reward`` (loaded from ``spec`` with ``kwargs``) in batches of ``batch_size``."""
    identity = {"name": reward.name, "version": reward.version, "spec": spec, "kwargs": kwargs,
                "batch_size": batch_size, "protocol": PROTOCOL, "msdda": __version__}
    one_at_a_time = threading.Lock()
    app = FastAPI(title=f"msdda reward server: {reward.name}", version=__version__)

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with one_at_a_time, torch.no_grad():
            return torch.cat([reward(images[start:start + batch_size], prompts[start:start + batch_size])
                              for start in range(0, len(images), batch_size)])

    @app.get("/health")
    def health() -> dict[str, Any]:
        return identity

    @app.post("/score")
    async def score_request(request: Request) -> Response:  # the raw body: safetensors bytes, not JSON
        try:
            images, prompts = decode_request(await request.body())
        except WireError as error:
            raise HTTPException(status_code=400, detail=f"bad request: {error}") from error
        scores = await run_in_threadpool(score, images, prompts)  # the event loop keeps answering /health
        return Response(content=encode_scores(scores), media_type=CONTENT_TYPE)

    return app


def serve_reward(spec: str, kwargs: dict[str, Any], host: str, port: int, batch_size: int, device: str) -> None:
    """Load the reward ``spec`` (a registered name or 'module:attribute') with ``kwargs`` on ``device``, then serve it
    on ``host:port`` until interrupted."""
    import uvicorn

    from msdda.diffusion import resolve_device
    from msdda.rewards.base import load_reward

    reward = load_reward(spec, **kwargs).to(resolve_device(device))
    app = reward_app(reward, spec, kwargs, batch_size)
    print(f"msdda reward serve: {reward.name} version {reward.version} at http://{host}:{port} "
          f"(health: /health; reward spec remote:http://{host}:{port}); Ctrl+C stops it", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
