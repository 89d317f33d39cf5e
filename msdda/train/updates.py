"""What every update shares: a batch of transitions, the optimizer step, and the update pass over an epoch.

An estimator's loss is a function ``loss(batch) -> StepLoss`` of a ``Transitions`` batch (one denoising step of
some trajectories); it gets the policy's step kernel from a ``KernelFunction``, so the same loss trains the
diffusion UNet in the trainer and a small denoiser in the analytic world's convergence test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from msdda.kernels import StepKernel, kernel_kl, standard_normal
from msdda.train.config import TrainConfig
from msdda.train.ema import averaged_values
from msdda.train.loss import StepLoss
from msdda.train.rollout import Trajectories

__all__ = ["Transitions", "KernelFunction", "Learner", "transitions", "update_pass", "LOGGED_TERMS"]

LOGGED_TERMS = ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl")
"""The StepLoss fields an epoch logs, averaged over its updates."""


@dataclass(frozen=True)
class Transitions:
    """N sampled transitions x_t -> x_{t-1} of the denoising step ``step``, and what their losses need."""

    step: int
    """The step's index into ``timesteps``."""
    timesteps: torch.Tensor
    """``[T]`` the whole schedule: the step's timestep, and those after it (for a continuation)."""
    latents: torch.Tensor
    """``[N, ...]`` x_t, as sampled (the model's input)."""
    next_latents: torch.Tensor | None
    """``[N, ...]`` x_{t-1}; None for states without a recorded action (the optimality gauge's)."""
    log_probs: torch.Tensor | None
    """``[N]`` log pi(x_{t-1} | x_t) under the policy that sampled them (None without a recorded action)."""
    advantages: torch.Tensor | None
    """``[N]`` (None without a recorded action)."""
    reference: StepKernel | None
    """The reference kernel p_ref(. | x_t), where the rollout recorded it."""
    noises: torch.Tensor | None
    """``[N, ...]`` the standard normal draws that made x_{t-1} (the pathwise update's reparameterisation)."""
    prompts: list[str]
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    """None for FLUX, which has no negative branch."""
    reward_gradients: torch.Tensor | None = None
    """``[N, ...]`` grad R_t at the recorded actions x_{t-1} (``train.reuse_reward_gradients``), else None."""

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step]

    def kl_to_reference(self, kernel: StepKernel, beta: float) -> torch.Tensor | None:
        """``[N]`` KL(kernel || p_ref) (with grad), or None when ``beta`` is 0 and the loss does not need it."""
        return kernel_kl(kernel, self.reference) if beta > 0 else None


KernelFunction = Callable[[Transitions], StepKernel]
"""The trained policy's step kernel pi_theta(. | x_t) at a batch's x_t (with grad)."""


def transitions(trajectories: Trajectories, advantages: torch.Tensor, rows: torch.Tensor, step: int,
                dtype: torch.dtype = torch.float32) -> Transitions:
    """The transitions of the trajectories ``rows`` (indices on the CPU) at ``step``, with their ``advantages``
    (``[B, T]``, best on the trajectories' device already). What the losses compute with is in ``dtype`` (the
    chain's float32 by default); x_t stays as sampled, for the model."""
    prompt_rows, rows = rows, rows.to(trajectories.latents.device, non_blocking=True)
    reference = None
    if trajectories.reference_means is not None:
        reference = StepKernel(mean=trajectories.reference_means[rows, step].to(dtype),
                               variance=trajectories.reference_variances[rows, step].to(dtype))
    return Transitions(
        step=step, timesteps=trajectories.timesteps, latents=trajectories.latents[rows, step],
        next_latents=trajectories.latents[rows, step + 1].to(dtype),
        log_probs=trajectories.log_probs[rows, step].to(dtype), advantages=advantages.to(rows.device)[rows, step],
        reference=reference,
        noises=trajectories.noises[rows, step].to(dtype) if trajectories.noises is not None else None,
        prompts=[trajectories.prompts[i] for i in prompt_rows.tolist()], prompt_embeds=trajectories.prompt_embeds[rows],
        negative_embeds=None if trajectories.negative_embeds is None else trajectories.negative_embeds[rows],
        reward_gradients=(None if trajectories.reward_gradients is None
                          else trajectories.reward_gradients[rows, step].to(dtype)))


@dataclass
class Learner:
    """What takes the gradient steps: the Accelerator, the model and optimizer it prepared, the trained
    parameters (which gradient clipping reads) and the clipping norm."""

    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]
    max_grad_norm: float
    lr_schedule: object | None = None
    """A torch LR scheduler stepped once per optimizer step, or None (a constant learning rate)."""
    optimizer_steps: int = 0
    """Optimizer steps taken (kept in checkpoints: a resumed run's schedule continues from it)."""
    ema: object | None = None
    """diffusers' EMAModel of ``parameters`` (msdda.train.ema), stepped after every optimizer step; None: no EMA."""

    def step(self) -> None:
        """Clip and apply the accumulated gradients (a no-op between accumulation boundaries), then clear them; the
        EMA and the learning-rate schedule follow every optimizer step."""
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.accelerator.sync_gradients:
            self.optimizer_steps += 1
            if self.lr_schedule is not None:
                self.lr_schedule.step()
            if self.ema is not None:
                self.ema.step(averaged_values(self.accelerator, self.parameters))

    def resume_schedule(self, optimizer_steps: int) -> None:
        """Continue the learning-rate schedule after ``optimizer_steps`` steps of a stopped run."""
        for _ in range(optimizer_steps - self.optimizer_steps):
            if self.lr_schedule is not None:
                self.lr_schedule.step()
        self.optimizer_steps = optimizer_steps


def update_pass(loss: Callable[[Transitions], StepLoss], trajectories: Trajectories, advantages: torch.Tensor,
                config: TrainConfig, learner: Learner, seeds: Sequence[int],
                dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Train on an epoch's trajectories: for each inner epoch (one seed each), minibatches of
    ``train.batch_size`` trajectories in random order, and within each ``trained_steps`` random steps of
    those that are actions (``Trajectories.stochastic``), one backward each (the Accelerator steps the optimizer
    every ``gradient_accumulation_steps`` of them). With ``train.fresh_noise`` each transition's action noise is
    drawn anew from the inner epoch's generator.

    Trajectories whose ``advantages`` row ``[B, T]`` is not finite (dropped samples) are left out. Returns the
    mean of each of ``LOGGED_TERMS`` over the updates. ``dtype`` is the losses' (see ``transitions``).
    """
    keep = torch.isfinite(advantages).all(dim=1)
    count, actions = len(trajectories.prompts), trajectories.stochastic.nonzero()[:, 0]
    # summed on the device and read once per epoch: reading a value every step would make the CPU wait for the GPU
    sums = dict.fromkeys(LOGGED_TERMS, 0.0)
    updates = 0
    advantages = advantages.to(learner.accelerator.device)
    learner.model.train()
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, config.train.batch_size):
            rows = order[start:start + config.train.batch_size]
            rows = rows[keep[rows]]
            step_order = actions[torch.randperm(len(actions), generator=generator)[:config.trained_steps]]
            for step in step_order.tolist():
                batch = transitions(trajectories, advantages, rows, step, dtype)
                if config.train.fresh_noise:  # the pathwise action's own draw: the states are reused, the noise not
                    batch = dataclasses.replace(batch, noises=standard_normal(batch.next_latents.shape, generator,
                                                                              batch.next_latents))
                with learner.accelerator.accumulate(learner.model):
                    terms = loss(batch)
                    learner.accelerator.backward(terms.loss)
                    learner.step()
                for key in sums:
                    sums[key] = sums[key] + getattr(terms, key).detach().float()
                updates += 1
    return {key: float(value) / max(updates, 1) for key, value in sums.items()}
