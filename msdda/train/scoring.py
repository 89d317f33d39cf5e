"""Rewards scored while sampling goes on: an epoch's rollouts are scored in the order they were sampled, either
at once (``reward.score_while_sampling`` off) or in one background thread while the next batch samples.

The background thread runs only msdda.train.rollout.score_rollout, which decodes and calls the reward and runs no
denoiser, so the two threads share no module whose state changes (the sampler routes the denoiser's adapter on
and off; the scorer never touches the denoiser). Every result is computed from the same tensors by the same
calls as without the thread, so the epoch's trajectories and rewards are the same bit for bit. The gain is the
reward's time where it leaves the sampler's thread free: waiting for a reward server's answer (HTTP releases
the GIL), or a reward on another device.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from msdda.train.rollout import Rollout, Trajectories, score_rollout

__all__ = ["RolloutScorer"]


class RolloutScorer:
    """Scores submitted rollouts in order with ``reward``, in a background thread when ``in_background``.

    Use as a context manager: leaving it (by an error included) stops the thread after the rollout it is scoring
    and drops the ones not started. A reward error reaches the caller at the next ``submit`` after it happened, or
    at ``results``.
    """

    def __init__(self, reward: Callable, in_background: bool) -> None:
        self.reward = reward
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msdda-reward") if in_background else None
        self.scored: list[Future | Trajectories] = []

    def __enter__(self) -> RolloutScorer:
        return self

    def __exit__(self, *_exception) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, rollout: Rollout) -> None:
        """Score ``rollout`` now, or queue it for the thread (first raising any reward error already raised there)."""
        if self.executor is None:
            self.scored.append(score_rollout(rollout, self.reward))
            return
        for future in self.scored:
            if future.done() and future.exception() is not None:
                raise future.exception()
        self.scored.append(self.executor.submit(score_rollout, rollout, self.reward))

    def results(self) -> list[Trajectories]:
        """The scored trajectories in submission order, waiting for the thread to finish them."""
        return [item.result() if isinstance(item, Future) else item for item in self.scored]
