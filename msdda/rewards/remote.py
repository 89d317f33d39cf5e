"""``remote:URL``: a reward scored by a reward server (``msdda reward serve``, msdda.rewards.serve) over HTTP.

It is a Reward like any other, so training, evaluate, sweep, CoDe and the studio take it where they take a name.
Loading it asks the server's ``/health`` what it serves and refuses, before any sampling, a server that serves
another reward than the ``name`` and ``version`` asked for (an adapter trained on a remote reward records the
ones its server reported, so evaluating or sweeping it later checks them again).

Faults: a server that is slow (``timeout``), unreachable or dead, that answers with an HTTP error (5xx, 408, 429) or
badly (not the protocol, the wrong number of scores, NaN or inf) is asked again up to ``retries`` times, waiting
``backoff``, then twice that, ... seconds, with one warning line per retry naming the URL. After a failure the
server's ``/health`` is read again before the next request, so a server restarted with another reward is refused
instead of scored with. When every try fails, :class:`RewardUnavailable` names the URL and the last fault;
scores that stay NaN or inf through every try are returned as they are (the trainer drops those samples, as it does
for a local reward's). Another HTTP 4xx is the client's own error and is raised at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from msdda.errors import UserError
from msdda.rewards.base import Reward
from msdda.rewards.wire import CONTENT_TYPE, WireError, decode_scores, encode_request

__all__ = ["RemoteReward", "RewardUnavailable", "REMOTE_PREFIX"]

REMOTE_PREFIX = "remote:"
RETRIED_STATUS = {408, 429}
"""HTTP errors below 500 that mean 'try again later' rather than 'your request is wrong'."""

logger = logging.getLogger(__name__)


class RewardUnavailable(UserError):
    """A reward server that gave no usable answer to any of the tries; the message names its URL and the fault."""


class _Fault(Exception):
    """One try's failure, retried while tries are left."""


class RemoteReward(Reward):
    """The reward served at ``url`` (``http://host:port``), checked against ``name`` and ``version`` when given."""

    differentiable = False  # no gradients come back over HTTP

    def __init__(self, url: str, name: str | None = None, version: str | None = None, timeout: float = 300.0,
                 retries: int = 3, backoff: float = 1.0) -> None:
        super().__init__()
        import httpx

        if not url.startswith(("http://", "https://")):
            raise UserError(f"remote reward {REMOTE_PREFIX}{url}: give the server's URL, e.g. "
                            f"{REMOTE_PREFIX}http://127.0.0.1:8000 (msdda reward serve prints it)")
        if not (timeout > 0 and retries >= 0 and backoff >= 0):
            raise UserError(f"remote reward {url}: timeout must be > 0 s, retries and backoff >= 0; got timeout={timeout}, "
                            f"retries={retries}, backoff={backoff}")
        self.url, self.retries, self.backoff = url.rstrip("/"), int(retries), float(backoff)
        self.expected = {key: str(value) for key, value in (("name", name), ("version", version)) if value is not None}
        self.client = httpx.Client(timeout=timeout)
        self.checked = False
        identity = self._with_retries(self._read_health, "reading its /health")
        self.name, self.version = str(identity["name"]), str(identity["version"])
        self.kwargs = identity.get("kwargs", {})
        """The constructor arguments the server loaded its reward with."""
        self.expected = {"name": self.name, "version": self.version}  # what every later /health must report

    def reload_kwargs(self, given: dict[str, Any]) -> dict[str, Any]:
        """The given arguments pinned to the name and version this server reported."""
        return {**given, "name": self.name, "version": self.version}

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        body = encode_request(images, list(prompts))
        scores = self._with_retries(lambda: self._post(body, len(images)), f"scoring {len(images)} images",
                                    nan_is_fault=True)
        nonfinite = int((~torch.isfinite(scores)).sum())
        if nonfinite:
            logger.warning("reward server %s: %d of %d scores stayed NaN or inf through %d tries; the trainer drops "
                           "those samples", self.url, nonfinite, len(images), self.retries + 1)
        return scores

    def _post(self, body: bytes, count: int) -> torch.Tensor:
        if not self.checked:  # after a failure: the server may have been restarted with another reward
            self._read_health()
        response = self._request("POST", "/score", content=body, headers={"content-type": CONTENT_TYPE})
        try:
            return decode_scores(response.content, count)
        except WireError as error:
            raise _Fault(f"answered badly: {error}") from error

    def _read_health(self) -> dict:
        identity = self._request("GET", "/health").json()
        if not isinstance(identity, dict) or not {"name", "version"} <= identity.keys():
            raise _Fault(f"its /health answered {str(identity)[:200]!r}, not a reward server's name and version")
        reported = {"name": str(identity["name"]), "version": str(identity["version"])}
        wrong = {key: value for key, value in self.expected.items() if reported[key] != value}
        if wrong:
            raise UserError(f"the reward server at {self.url} serves {reported['name']!r} version "
                            f"{reported['version']!r}, not the {' and '.join(f'{k} {v!r}' for k, v in wrong.items())} "
                            "asked for: start the server with that reward, or point the spec at the server that has it")
        self.checked = True
        return identity

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = self.client.request(method, self.url + path, **kwargs)
        except httpx.TimeoutException as error:
            raise _Fault(f"gave no answer within {self.client.timeout.read} s ({type(error).__name__})") from error
        except httpx.TransportError as error:
            raise _Fault(f"cannot be reached ({type(error).__name__}: {error})") from error
        if response.status_code >= 500 or response.status_code in RETRIED_STATUS:
            raise _Fault(f"answered HTTP {response.status_code} ({response.text[:200]})")
        if response.status_code >= 400:
            raise RewardUnavailable(f"the reward server at {self.url} refused the request {method} {path}: HTTP "
                                    f"{response.status_code} ({response.text[:200]})")
        return response

    def _with_retries(self, attempt, what: str, nan_is_fault: bool = False):
        """``attempt()`` until it succeeds, up to ``retries`` more times. With ``nan_is_fault``, scores with NaN or inf
        are tried again too, and returned as they are when the last try still had them."""
        for tried in range(self.retries + 1):
            nonfinite_scores = None
            try:
                result = attempt()
            except _Fault as error:
                self.checked, fault = False, str(error)
            else:
                nonfinite = int((~torch.isfinite(result)).sum()) if nan_is_fault else 0
                if not nonfinite:
                    return result
                nonfinite_scores, fault = result, f"answered {nonfinite} NaN or inf scores"
            if tried < self.retries:
                wait = self.backoff * 2**tried
                logger.warning("reward server %s %s while %s; trying again in %.1f s (try %d of %d)", self.url, fault,
                               what, wait, tried + 2, self.retries + 1)
                time.sleep(wait)
        if nonfinite_scores is not None:
            return nonfinite_scores
        raise RewardUnavailable(f"the reward server at {self.url} {fault} while {what}, on each of "
                                f"{self.retries + 1} tries; start it (msdda reward serve ...) or raise retries and timeout, "
                                "then run again")
