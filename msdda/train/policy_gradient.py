"""The policy-gradient estimator (DDPO/DPOK): a clipped score-function update with the exact KL, any reward."""

from __future__ import annotations

from msdda.train.config import TrainConfig
from msdda.train.loss import StepLoss, step_loss
from msdda.train.updates import KernelFunction, Transitions

__all__ = ["policy_gradient_loss"]


def policy_gradient_loss(policy: KernelFunction, batch: Transitions, config: TrainConfig) -> StepLoss:
    """The clipped policy-gradient loss of ``batch`` under the current ``policy``, plus beta * KL to the reference.

    The importance ratio is against the log-probs the batch was sampled with, so the same transitions can be
    trained on for several inner epochs (``train.inner_epochs``).
    """
    kernel = policy(batch)
    kl = batch.kl_to_reference(kernel, config.beta)
    log_prob = kernel.log_prob(batch.next_latents)
    return step_loss(log_prob, batch.log_probs, batch.advantages, kl, config.beta, config.train.clip_range,
                     config.train.advantage_clip)
