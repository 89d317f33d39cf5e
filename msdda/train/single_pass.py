"""The single-pass on-policy update (``train.single_pass``): one gradient step through the sampling graph.

The policy is still the one that sampled, so each transition's loss and gradient are the update pass's at its
first step (ratio 1), without running the trained steps' forwards again.
"""

from __future__ import annotations

import torch

from msdda.train.config import TrainConfig
from msdda.train.distributed import average_gradients
from msdda.train.loss import step_loss
from msdda.train.rollout import Trajectories
from msdda.train.updates import LOGGED_TERMS, Learner

__all__ = ["single_pass_update"]


def single_pass_update(trajectories: Trajectories, advantages: torch.Tensor, config: TrainConfig,
                       learner: Learner) -> dict[str, float]:
    """Backpropagate the policy-gradient loss of the trajectories' ``graph_steps`` (differentiable log-probs and
    KLs recorded while sampling) and take one optimizer step; rows whose ``advantages`` are not finite are left
    out. Returns the logged StepLoss terms."""
    keep = torch.isfinite(advantages).all(dim=1).to(trajectories.graph_log_probs.device)
    log_prob = trajectories.graph_log_probs[keep].reshape(-1)
    advantages = advantages.to(keep.device).gather(1, trajectories.graph_step_indices.to(keep.device))
    kl = trajectories.graph_kls[keep].reshape(-1) if trajectories.graph_kls is not None else None
    terms = step_loss(log_prob, log_prob.detach(), advantages[keep].reshape(-1), kl, config.beta,
                      config.train.clip_range, config.train.advantage_clip)
    accelerator = learner.accelerator
    if len(log_prob):
        accelerator.backward(terms.loss)
    if accelerator.num_processes > 1:  # the forward ran outside DDP's wrapper, which would all-reduce
        average_gradients(accelerator, learner.parameters)
    learner.step()
    return {key: float(getattr(terms, key).detach()) for key in LOGGED_TERMS}
