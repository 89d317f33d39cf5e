"""The step-level KL-regularised RL loss, as pure tensor maths.

Each denoising step is its own problem: maximise E[R_t] - beta * KL(pi(.|x_t) || p_ref(.|x_t)), whose optimum
is p_ref * exp(R_t / beta) / Z. The update is a clipped-ratio policy gradient on log pi(x_{t-1} | x_t) with
per-prompt baselines (msdda.train.advantages) plus beta times the exact Gaussian KL to the reference
(DPOK). Log-probs and KLs are summed over all latent elements, so beta keeps its meaning as the KL weight of
the objective and the adapter's optimum is the one MSDDA fuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msdda.errors import UserError

__all__ = ["StepLoss", "step_loss", "pathwise_step_loss"]


@dataclass(frozen=True)
class StepLoss:
    """The loss of one minibatch of transitions, and what to log about it (all scalars)."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def step_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    kl_to_reference: torch.Tensor | None,
    beta: float,
    clip_range: float,
    advantage_clip: float | None = None,
) -> StepLoss:
    """Clipped policy gradient on the step log-probs plus beta * exact KL to the reference.

    Args:
        log_prob: ``[N]`` log pi_theta(x_{t-1} | x_t) under the current adapter (with grad).
        old_log_prob: ``[N]`` the same under the policy that sampled the transitions.
        advantages: ``[N]`` step-reward advantages.
        kl_to_reference: ``[N]`` KL(pi_theta(.|x_t) || p_ref(.|x_t)) (with grad), or None when beta is 0.
        beta: the KL weight.
        clip_range: PPO's epsilon on the probability ratio.
        advantage_clip: clamp advantages to [-c, c] (DDPO's adv_clip_max), or None.
    """
    if advantage_clip is not None:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl = kl_to_reference.mean() if kl_to_reference is not None else torch.zeros((), device=log_prob.device)
    if beta and kl_to_reference is None:
        raise UserError(f"beta={beta} needs the KL to the reference; pass kl_to_reference")
    with torch.no_grad():
        clip_fraction = ((ratio - 1).abs() > clip_range).float().mean()
        approx_kl = 0.5 * (log_ratio**2).mean()
    return StepLoss(loss=policy_loss + beta * kl, policy_loss=policy_loss.detach(), kl=kl.detach(),
                    clip_fraction=clip_fraction, approx_kl=approx_kl)


def pathwise_step_loss(step_reward: torch.Tensor, kl_to_reference: torch.Tensor | None, beta: float) -> StepLoss:
    """Minus the step objective E[R_t] - beta * KL, with R_t differentiable in the reparameterised action.

    The same objective and optimum as ``step_loss``; the gradient comes from the reward's slope along
    x_{t-1} = mean + std * noise instead of from the score, so its variance does not grow with the latent
    dimension the way the score function's does.

    Args:
        step_reward: ``[N]`` R_t(x_{t-1}) with grad flowing to the policy's mean.
        kl_to_reference: ``[N]`` KL(pi_theta(.|x_t) || p_ref(.|x_t)) (with grad), or None when beta is 0.
        beta: the KL weight.
    """
    if beta and kl_to_reference is None:
        raise UserError(f"beta={beta} needs the KL to the reference; pass kl_to_reference")
    finite = torch.isfinite(step_reward)  # a reward that fails on some images: those rows carry no gradient
    policy_loss = -torch.where(finite, step_reward, 0.0).sum() / finite.sum().clamp(min=1)
    kl = kl_to_reference.mean() if kl_to_reference is not None else torch.zeros((), device=step_reward.device)
    zero = torch.zeros((), device=step_reward.device)
    return StepLoss(loss=policy_loss + beta * kl, policy_loss=policy_loss.detach(), kl=kl.detach(),
                    clip_fraction=zero, approx_kl=zero)
