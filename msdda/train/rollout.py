"""Rollouts: sample trajectories with the current adapter and record every step's Gaussian kernel.

Per step we keep x_t, x_{t-1}, the timestep and log pi(x_{t-1} | x_t) under the sampling policy, and,
when the KL or a dense step reward needs it, the reference kernel's mean and variance (the same UNet with the
adapter disabled). One reference forward per step serves both: its kernel at x_t gives the KL target for step t, and
its x0 estimate at x_{t-1} (the next step's state) is the ``tweedie`` step reward's clean image.

The policy and the reference run as two forwards, not one PEFT mixed-adapter batch: on the world's UNet the
mixed batch's per-layer row routing costs more than the second forward's launch.

The update's policy kernel (``Trainer.policy_kernel``) is :meth:`Sampler.policy_kernel` of the trained denoiser: one
code path for pi_old here and pi_theta there, equal bit for bit on-policy.

A rollout samples first (:func:`sample_rollout`: every denoiser forward) and is scored after (:func:`score_rollout`:
decoding and the reward calls), so that the trainer can score one batch while it samples the next
(msdda.train.scoring).

At ``graph_steps`` the policy's forward keeps its autograd graph, and the step's log-prob and KL to the
reference come back differentiable: an on-policy update can backpropagate through them instead of running
that forward again (``train.single_pass``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from msdda.diffusion import BASE, adapter_kernels, decode_latents, prepare_sampling
from msdda.errors import UserError
from msdda.kernels import StepKernel, kernel_kl
from msdda.sampling import Step, denoise
from msdda.train.config import SamplingSettings

__all__ = ["Sampler", "Conditioning", "Trajectories", "Rollout", "sample_trajectories", "sample_rollout",
           "score_rollout", "reference_continuation", "StepRewardName", "STEP_REWARDS"]

StepRewardName = Literal["terminal", "tweedie", "rollout"]
STEP_REWARDS = ("terminal", "tweedie", "rollout")


@dataclass(frozen=True)
class Sampler:
    """What a rollout samples with: the pipeline (its scheduler and VAE), the denoiser carrying the adapter
    (``unet``: a UNet or a flow transformer), the base denoiser where it runs apart from it (``reference_unet``, e.g.
    compiled; None: ``unet`` with its adapter routed off), and the sampler's settings."""

    pipeline: object
    unet: torch.nn.Module
    num_inference_steps: int
    noise_scale: float | None
    """The sampler's noise setting (msdda.diffusion.sampler_kernel): DDIM's eta, or the flow SDE's noise level."""
    guidance_scale: float
    resolution: int | None = None
    """The images' side in pixels (None: the pipeline's default)."""
    reference_unet: torch.nn.Module | None = None

    @classmethod
    def of(cls, pipeline, unet: torch.nn.Module, sampling: SamplingSettings,
           reference_unet: torch.nn.Module | None = None) -> Sampler:
        """The sampler a training config's ``sampling`` settings describe."""
        return cls(pipeline, unet, sampling.num_inference_steps, sampling.noise_scale, sampling.guidance_scale,
                   sampling.resolution, reference_unet)

    def policy_kernel(self, latents: torch.Tensor, timestep: torch.Tensor, positive: torch.Tensor,
                      negative: torch.Tensor | None) -> StepKernel:
        """pi(.|x_t): the denoiser as configured (its adapter on), through the one guided forward."""
        return adapter_kernels(self.unet, self.pipeline.scheduler, latents, timestep, positive, negative, None,
                               self.guidance_scale, self.noise_scale)[0]

    def reference_kernel(self, latents: torch.Tensor, timestep: torch.Tensor, positive: torch.Tensor,
                         negative: torch.Tensor | None, noise_scale: float | None) -> StepKernel:
        """p_ref(.|x_t) at ``noise_scale``: ``reference_unet`` as it is, or else ``unet`` with its adapter routed
        off."""
        unet, names = (self.reference_unet, None) if self.reference_unet is not None else (self.unet, [BASE])
        return adapter_kernels(unet, self.pipeline.scheduler, latents, timestep, positive, negative, names,
                               self.guidance_scale, noise_scale)[0]


@dataclass(frozen=True)
class Conditioning:
    """A batch's prompts and their encodings (msdda.diffusion.encode_prompts)."""

    prompts: list[str]
    positive: torch.Tensor  # [B, L, D]
    negative: torch.Tensor | None  # [B, L, D]; None where guidance is distilled (FLUX)


@dataclass
class Trajectories:
    """B sampled trajectories of T steps (tensors on the sampling device, detached), all stochastic but perhaps the
    last (DDPM's step into x_0), which is no action: it has no log-prob or KL and is not trained."""

    prompts: list[str]
    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_embeds: torch.Tensor | None  # [B, L, D]; None for FLUX (no negative branch)
    timesteps: torch.Tensor  # [T]
    stochastic: torch.Tensor  # [T] bool, on the CPU: the steps that are actions (all but a deterministic last one)
    latents: torch.Tensor  # [B, T + 1, C, H, W]: x_T ... x_0
    log_probs: torch.Tensor  # [B, T]
    noises: torch.Tensor | None  # [B, T, C, H, W]: each step's standard normal draw (kept for the pathwise update)
    reference_means: torch.Tensor | None  # [B, T, C, H, W]
    reference_variances: torch.Tensor | None  # [B, T, 1, 1, 1] (scheduler variance) or [B, T, C, H, W] (learned)
    step_rewards: torch.Tensor  # [B, T]: R_t for the step leaving timesteps[t]
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]: the decoded x_0
    graph_step_indices: torch.Tensor | None = None
    """[B, K]: the step indices (into ``timesteps``) of each row's K ``graph_steps``."""
    graph_log_probs: torch.Tensor | None = None
    """[B, K]: log pi(x_{t-1} | x_t) at the K ``graph_steps``, differentiable in the adapter's weights."""
    graph_kls: torch.Tensor | None = None
    """[B, K]: KL(pi(.|x_t) || p_ref(.|x_t)) at the ``graph_steps``, differentiable (when the reference ran)."""
    state_values: torch.Tensor | None = None
    """[B, T]: the step reward's estimator applied to x_t itself (dense step rewards only). It depends on the
    state, not on the action x_{t-1}, so subtracting it keeps the step's policy gradient unbiased while
    removing the reward the step inherited: R_t - V(x_t) is what this step added."""
    reward_gradients: torch.Tensor | None = None
    """[B, T, C, H, W]: grad R_t at each recorded action x_{t-1}, taken once per epoch for
    ``train.reuse_reward_gradients`` (msdda.train.pathwise.step_reward_gradients); NaN rows where R_t was not finite."""

    @property
    def final_rewards(self) -> torch.Tensor:
        return self.step_rewards[:, -1]


def _per_sample(variance: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """A kernel's variance with a batch dimension (a scheduler variance is 0-d or [B, 1, ...]), to stack per step."""
    return variance.expand(torch.broadcast_shapes(variance.shape, (mean.shape[0],) + (1,) * (mean.ndim - 1)))


@dataclass(frozen=True)
class Rollout:
    """A batch's trajectories before their reward calls (:func:`sample_rollout`), and the latents those calls score
    (:func:`score_rollout`): the final x_0 and, for a dense step reward, the clean latents of every state x_T ... x_1
    (the reference's x0 estimate for ``tweedie``, its deterministic continuation for ``rollout``)."""

    pipeline: object
    prompts: list[str]
    step_reward: StepRewardName
    final_latents: torch.Tensor
    state_latents: list[torch.Tensor]
    recorded: dict
    """Every field of Trajectories but ``step_rewards``, ``images`` and ``state_values``."""


@torch.no_grad()
def sample_trajectories(sampler: Sampler, reward: Callable, conditioning: Conditioning, step_reward: StepRewardName,
                        generator: torch.Generator, need_reference: bool = False, keep_noises: bool = False,
                        graph_steps: torch.Tensor | None = None) -> Trajectories:
    """Sample with the adapter on; score each step with ``step_reward``; see the module docstring.

    ``need_reference`` records the reference's kernel at every step (the KL's target; ``tweedie`` needs it anyway).
    ``keep_noises`` stores each step's noise draw (as large as the latents), which only the pathwise update reads.
    ``graph_steps`` (``[T]`` bool) marks the steps whose log-prob and KL keep their graph.
    """
    rollout = sample_rollout(sampler, conditioning, step_reward, generator, need_reference, keep_noises, graph_steps)
    return score_rollout(rollout, reward)


@torch.no_grad()
def sample_rollout(sampler: Sampler, conditioning: Conditioning, step_reward: StepRewardName,
                   generator: torch.Generator, need_reference: bool = False, keep_noises: bool = False,
                   graph_steps: torch.Tensor | None = None) -> Rollout:
    """:func:`sample_trajectories` up to its reward calls: every denoiser forward it runs (the ``rollout`` step
    reward's reference continuations included), none of the decoding and scoring."""
    if step_reward not in STEP_REWARDS:
        raise UserError(f"step_reward must be one of {STEP_REWARDS}, got {step_reward!r}")
    pipeline, prompts = sampler.pipeline, conditioning.prompts
    prompt_embeds, negative_embeds = conditioning.positive, conditioning.negative
    batch = len(prompts)
    latents = prepare_sampling(pipeline, sampler.num_inference_steps, batch, generator, prompt_embeds,
                               sampler.resolution, sampler.resolution)
    timesteps = pipeline.scheduler.timesteps
    need_reference = need_reference or step_reward == "tweedie"
    graph_steps = torch.zeros(len(timesteps), dtype=torch.bool) if graph_steps is None else graph_steps.cpu()
    keeps_graph = graph_steps.tolist()
    recording = _Recording(latents, keep_noises)

    def kernel_at(index: int, timestep: torch.Tensor, x_t: torch.Tensor) -> StepKernel:
        if need_reference:
            recording.reference = sampler.reference_kernel(x_t, timestep, prompt_embeds, negative_embeds,
                                                           sampler.noise_scale)
        with torch.set_grad_enabled(keeps_graph[index]):
            kernel = sampler.policy_kernel(x_t, timestep, prompt_embeds, negative_embeds)
        if not keeps_graph[index]:
            return kernel
        recording.graph_kernel = kernel  # the loop samples from a detached copy: no graph runs across steps
        return StepKernel(kernel.mean.detach(), kernel.variance.detach(), kernel.pred_original_sample)

    latents = denoise(timesteps, latents, kernel_at, generator, prompt_embeds, recording.record)
    stochastic = recording.check_stochastic(timesteps)
    with torch.enable_grad():  # stacking under no_grad would cut the graphs
        graph_log_probs = torch.stack(recording.graph_log_probs, dim=1) if recording.graph_log_probs else None
        graph_kls = torch.stack(recording.graph_kls, dim=1) if recording.graph_kls else None
    if step_reward == "tweedie":  # the estimator at every state x_T ... x_1 is r(x0_hat_ref(state)); at x_0 r(x_0)
        state_latents = recording.reference_x0
    elif step_reward == "rollout":  # r of the deterministic reference continuation from every state x_T ... x_1
        state_latents = [reference_continuation(sampler, recording.states[i], timesteps[i:], prompt_embeds,
                                                negative_embeds) for i in range(len(timesteps))]
    else:
        state_latents = []
    recorded = dict(
        prompts=list(prompts), prompt_embeds=prompt_embeds, negative_embeds=negative_embeds, timesteps=timesteps,
        stochastic=stochastic,
        latents=torch.stack(recording.states, dim=1),
        noises=torch.stack(recording.noises, dim=1) if keep_noises else None,
        log_probs=torch.stack(recording.log_probs, dim=1),
        reference_means=torch.stack(recording.reference_means, dim=1) if need_reference else None,
        reference_variances=torch.stack(recording.reference_variances, dim=1) if need_reference else None,
        graph_log_probs=graph_log_probs, graph_kls=graph_kls,
        graph_step_indices=graph_steps.nonzero()[:, 0].expand(batch, -1) if graph_log_probs is not None else None,
    )
    return Rollout(pipeline, list(prompts), step_reward, latents, state_latents, recorded)


@torch.no_grad()
def score_rollout(rollout: Rollout, reward: Callable) -> Trajectories:
    """The rollout's trajectories with their step rewards: decode its latents and call the reward on them. It runs no
    denoiser, so it may run in another thread while the next batch samples (msdda.train.scoring)."""
    pipeline, prompts = rollout.pipeline, rollout.prompts
    images = decode_latents(pipeline, rollout.final_latents)
    final_reward = reward(images, prompts).to(torch.float32)
    steps = len(rollout.recorded["timesteps"])
    if rollout.step_reward == "terminal":
        step_rewards, state_values = final_reward[:, None].expand(len(prompts), steps).clone(), None
    else:
        values = [reward(decode_latents(pipeline, x0), prompts).to(torch.float32) for x0 in rollout.state_latents]
        values.append(final_reward)
        state_values = torch.stack(values[:-1], dim=1)  # V(x_t) for the step leaving x_t
        step_rewards = torch.stack(values[1:], dim=1)  # R_t = V(x_{t-1})
    return Trajectories(**rollout.recorded, step_rewards=step_rewards, images=images, state_values=state_values)


class _Recording:
    """What a rollout keeps of each step, filled by the loop's recorder. ``reference`` and ``graph_kernel`` hold
    this step's reference kernel and the policy kernel with its graph, set while the step's kernel is made."""

    def __init__(self, start: torch.Tensor, keep_noises: bool) -> None:
        self.keep_noises = keep_noises
        self.states, self.noises, self.log_probs, self.deterministic = [start], [], [], []
        self.reference_means, self.reference_variances, self.reference_x0 = [], [], []
        self.graph_log_probs, self.graph_kls = [], []
        self.reference: StepKernel | None = None
        self.graph_kernel: StepKernel | None = None

    def record(self, step: Step) -> None:
        reference, graph_kernel = self.reference, self.graph_kernel
        self.reference = self.graph_kernel = None
        if reference is not None:
            self.reference_means.append(reference.mean)
            self.reference_variances.append(_per_sample(reference.variance, reference.mean))
            self.reference_x0.append(reference.pred_original_sample)
        deterministic = step.kernel.is_deterministic
        self.deterministic.append(deterministic)
        if deterministic:  # no density: the step is no action (check_stochastic allows it only last)
            if graph_kernel is not None:
                raise UserError("train.single_pass cannot train this schedule: its last step is deterministic "
                                "(DDPM's step into x_0) and has no log-prob to keep a graph of; set "
                                "train.single_pass=false")
            log_prob = torch.zeros(len(step.next_latents), device=step.next_latents.device)
        else:
            with torch.set_grad_enabled(graph_kernel is not None):
                log_prob = (step.kernel if graph_kernel is None else graph_kernel).log_prob(step.next_latents)
                if graph_kernel is not None:
                    self.graph_log_probs.append(log_prob)
                    if reference is not None:
                        self.graph_kls.append(kernel_kl(graph_kernel, reference))
        if self.keep_noises:
            self.noises.append(step.noise)
        self.log_probs.append(log_prob.detach())
        self.states.append(step.next_latents)

    def check_stochastic(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The steps that are actions, ``[T]`` bool: all must be stochastic but the last (DDPM's step into x_0)."""
        deterministic = torch.tensor(self.deterministic)
        if deterministic[:-1].any():
            raise UserError(
                f"the step at timestep {int(timesteps[deterministic[:-1].nonzero()[0, 0]])} is deterministic "
                "(variance 0); RL needs stochastic steps: use eta > 0 with DDIM (and set_alpha_to_one=False, as Stable "
                "Diffusion's config has)")
        if deterministic.all():
            raise UserError("every step of the schedule is deterministic; RL needs stochastic steps")
        return ~deterministic


def reference_continuation(sampler: Sampler, latents: torch.Tensor, remaining_timesteps: torch.Tensor,
                           prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None) -> torch.Tensor:
    """x_0 of the deterministic (noise 0: DDIM's eta = 0, the flow ODE) reference continuation from ``latents``
    over ``remaining_timesteps``: the ``rollout`` step reward's image. Differentiable in ``latents`` when grad is
    enabled (the pathwise update)."""
    def reference_kernel(_index: int, timestep: torch.Tensor, x_t: torch.Tensor) -> StepKernel:
        return sampler.reference_kernel(x_t, timestep, prompt_embeds, negative_embeds, 0.0)

    return denoise(remaining_timesteps, latents, reference_kernel)
