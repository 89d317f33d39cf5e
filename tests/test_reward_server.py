"""Reward servers: ``msdda reward serve`` in a real process on 127.0.0.1, ``remote:`` specs scoring with it (the same
scores as the local reward, bit for bit), refused when the server serves another reward, and the faults a client
meets: slow, dead and badly answering servers, and a server killed mid-epoch under a training run that then resumes
to the result of a run that never stopped."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from safetensors.torch import load_file

from msdda.adapters import WEIGHTS_FILE, load_adapter_metadata
from msdda.cli import main
from msdda.config import load_config
from msdda.errors import UserError
from msdda.rewards import load_reward
from msdda.rewards.remote import RewardUnavailable
from msdda.rewards.wire import decode_request, encode_scores
from msdda.train import TrainConfig
from msdda.train.checkpoint import latest_checkpoint
from msdda.train.trainer import Trainer
from tests.user_rewards import DIE_AFTER

ROOT = Path(__file__).resolve().parents[1]
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
PROMPTS = ["a red circle on the left", "a blue square in the center", "a green triangle at the top"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(port: int, *arguments: str, environment: dict | None = None) -> subprocess.Popen:
    """``msdda reward serve`` in its own process, once its /health answers."""
    server = subprocess.Popen([sys.executable, "-m", "msdda.cli", "reward", "serve", *arguments, "--port", str(port),
                               "--device", "cpu"], cwd=ROOT, env={**CPU_ONLY, **(environment or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return server
        except httpx.HTTPError:
            assert server.poll() is None, f"the server exited: {server.stdout.read()}"
            assert time.time() < deadline, "the server did not answer within 120 s"
            time.sleep(0.2)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def redness_server():
    """One server for the module: a user reward with constructor arguments, scored 3 images at a time."""
    port = _free_port()
    server = _start_server(port, "tests.user_rewards:Redness", "--kwargs", "{strength: 2.0}", "--batch-size", "3")
    yield f"http://127.0.0.1:{port}"
    _stop(server)


def test_health_names_the_served_reward_its_version_and_kwargs(redness_server) -> None:
    health = httpx.get(f"{redness_server}/health").json()
    assert {key: health[key] for key in ("name", "version", "spec", "kwargs", "batch_size")} == {
        "name": "redness", "version": "1", "spec": "tests.user_rewards:Redness", "kwargs": {"strength": 2.0},
        "batch_size": 3}


def test_remote_scores_are_the_local_reward_s_bit_for_bit(redness_server) -> None:
    """7 images go in one request and are scored in chunks of the server's batch size 3, in their memory layout."""
    images = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = (PROMPTS * 3)[:7]
    remote = load_reward(f"remote:{redness_server}", name="redness", version="1")
    local = load_reward("tests.user_rewards:Redness", strength=2.0)
    assert (remote.name, remote.version, remote.differentiable) == ("redness", "1", False)
    assert torch.equal(remote(images, prompts), local(images, prompts))
    # a channels-last VAE's images sum in another order: they travel in their layout and score as they do here
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(remote(channels_last, prompts), local(channels_last, prompts))


def test_a_server_serving_another_reward_is_refused_before_any_work(redness_server, tmp_path) -> None:
    config = load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml", [
        f"output_dir={tmp_path / 'run'}", f"reward.name=remote:{redness_server}", "reward.kwargs.name=world-aesthetic",
        "train.estimator=policy-gradient", "reward.step_reward=terminal"])
    with pytest.raises(UserError, match=f"the reward server at {redness_server} serves 'redness' version '1', not "
                                        "the name 'world-aesthetic' asked for"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_a_request_that_breaks_the_protocol_is_answered_400_with_what_was_wrong(redness_server) -> None:
    response = httpx.post(f"{redness_server}/score", content=b"not safetensors")
    assert response.status_code == 400 and "not a safetensors file" in response.json()["detail"]


class MisbehavingServer:
    """A real HTTP server (uvicorn in a thread) that answers /score as ``fault`` says for its first ``faults``
    requests, then correctly: wrong-length answers, NaN scores, HTTP 500, 422, or answers slower than the client
    waits; after a fault it may report another reward on /health (``renamed_after_fault``)."""

    def __init__(self, fault: str, faults: int, renamed_after_fault: bool = False) -> None:
        self.requests, self.faulted = 0, False
        app = FastAPI()

        @app.get("/health")
        def health() -> dict:
            renamed = renamed_after_fault and self.faulted
            return {"name": "thirds-now" if renamed else "brightness", "version": "1"}

        @app.post("/score")
        async def score(request: Request) -> Response:
            images, _ = decode_request(await request.body())
            self.requests += 1
            scores = images.mean(dim=(1, 2, 3))
            if self.requests <= faults:
                self.faulted = True
                if fault in ("500", "422"):
                    return Response("the judge fell over", status_code=int(fault))
                if fault == "slow":
                    await asyncio.sleep(1.0)
                scores = scores[:-1] if fault == "short" else torch.full_like(scores, float("nan")) \
                    if fault == "nan" else scores
            return Response(encode_scores(scores), media_type="application/octet-stream")

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> MisbehavingServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *_exception) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


IMAGES = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fault, line", [
    ("short", "answered badly: (2,) torch.float32 scores for 3 images"),
    ("500", "answered HTTP 500 (the judge fell over)"),
    ("slow", "gave no answer within 0.3 s (ReadTimeout)"),
])
def test_a_bad_server_is_tried_a_bounded_number_of_times_then_named_with_its_fault(fault, line, caplog) -> None:
    with MisbehavingServer(fault, faults=99) as server:
        remote = load_reward(f"remote:{server.url}", retries=2, backoff=0.01, timeout=0.3)
        with caplog.at_level(logging.WARNING, "msdda.rewards.remote"), \
                pytest.raises(RewardUnavailable, match=re.escape(f"the reward server at {server.url} {line}")):
            remote(IMAGES, PROMPTS)
        assert server.requests == 3  # the first try and 2 retries
    retries = [record.getMessage() for record in caplog.records]
    assert len(retries) == 2 and all(server.url in message and "trying again" in message for message in retries)


def test_a_fault_that_passes_is_retried_and_the_scores_are_the_right_ones() -> None:
    with MisbehavingServer("500", faults=1) as server:
        scores = load_reward(f"remote:{server.url}", retries=2, backoff=0.01)(IMAGES, PROMPTS)
        assert server.requests == 2
    assert torch.equal(scores, IMAGES.mean(dim=(1, 2, 3)))


def test_scores_that_stay_nan_are_returned_as_a_local_reward_s_would_be() -> None:
    """The trainer drops NaN-scored samples, as for a local reward; the client first asks again."""
    with MisbehavingServer("nan", faults=99) as server:
        scores = load_reward(f"remote:{server.url}", retries=1, backoff=0.01)(IMAGES, PROMPTS)
        assert server.requests == 2
    assert torch.isnan(scores).all()


def test_a_client_error_is_not_retried() -> None:
    with MisbehavingServer("422", faults=99) as server:
        with pytest.raises(RewardUnavailable, match="refused the request POST /score: HTTP 422"):
            load_reward(f"remote:{server.url}", retries=3, backoff=0.01)(IMAGES, PROMPTS)
        assert server.requests == 1


def test_a_server_that_comes_back_with_another_reward_is_refused() -> None:
    with MisbehavingServer("500", faults=1, renamed_after_fault=True) as server:
        remote = load_reward(f"remote:{server.url}", retries=2, backoff=0.01)
        with pytest.raises(UserError, match="serves 'thirds-now' version '1', not the name 'brightness'"):
            remote(IMAGES, PROMPTS)
        assert server.requests == 1


KILLED = ["epochs=2", "sampling.num_inference_steps=3", "sampling.batch_size=2", "sampling.batches_per_epoch=2",
          "train.batch_size=2", "sample_every=0", "log_with=null", "checkpoint.every=5", "train.gauge_prompts=0",
          "train.estimator=policy-gradient", "reward.step_reward=terminal", "reward.score_while_sampling=true"]
"""Two epochs of two sampling batches, one reward request each, and no checkpoint of its own before the end."""


def _train(output_dir: Path, reward: str, *extra: str) -> int:
    return main(["train", "--config", str(ROOT / "configs/train/world_aesthetic.yaml"), *KILLED,
                 f"output_dir={output_dir}", f"reward.name={reward}", *extra])


def test_a_server_killed_mid_epoch_stops_the_run_resumable_and_the_resumed_run_ends_as_an_unbroken_one(
        tmp_path, capsys) -> None:
    assert _train(tmp_path / "local", "tests.user_rewards:ServedAesthetic") == 0
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(port, "tests.user_rewards:ServedAesthetic", environment={DIE_AFTER: "2"})
    try:  # it answers epoch 1's two requests, and dies on the first of epoch 2
        assert _train(tmp_path / "remote", f"remote:{url}", "reward.kwargs.retries=1",
                      "reward.kwargs.backoff=0.01") == 2
    finally:
        server.wait(timeout=30)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("msdda: error:")]
    assert len(errors) == 1 and f"the reward server at {url} cannot be reached" in errors[0]
    assert "stopped in epoch 2" in errors[0] and "--resume" in errors[0]
    assert latest_checkpoint(tmp_path / "remote").name == "checkpoint-00001"  # saved as it stopped: nothing lost
    server = _start_server(port, "tests.user_rewards:ServedAesthetic")
    try:
        assert _train(tmp_path / "remote", f"remote:{url}", "--resume") == 0
    finally:
        _stop(server)
    local, remote = (load_file(tmp_path / run / "final" / WEIGHTS_FILE) for run in ("local", "remote"))
    assert local.keys() == remote.keys() and all(torch.equal(local[key], remote[key]) for key in local)
    metadata = load_adapter_metadata(tmp_path / "remote" / "final")
    assert (metadata.reward_spec, metadata.reward_name) == (f"remote:{url}", "served-aesthetic")
    assert metadata.reward_kwargs == {"name": "served-aesthetic", "version": "1"}  # pinned to what the server reported
