"""The training config: one dataclass tree, loaded from YAML with ``key.sub=value`` overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from msdda.errors import UserError
from msdda.kernels import DEFAULT_FLOW_NOISE_LEVEL
from msdda.prompts import check_prompts_spec, load_prompts

__all__ = ["TrainConfig", "LoraSettings", "SamplingSettings", "RewardSettings", "OptimSettings",
           "CheckpointSettings", "EmaSettings", "TRACKERS"]

TRACKERS = ("tensorboard", "wandb")
"""The experiment trackers ``log_with`` names (Accelerate's names for them)."""


@dataclass
class RewardSettings:
    name: str = "world-aesthetic"
    """A registered reward (msdda.rewards.available_rewards()), 'package.module:name', or 'remote:http://host:port' for
    a reward server (``msdda reward serve``; its kwargs: name, version, timeout, retries, backoff; docs/rewards.md)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    step_reward: Literal["terminal", "tweedie", "rollout"] = "terminal"
    score_while_sampling: bool = False
    """Score each sampling batch's rewards in a background thread while the next batch samples (with
    ``sampling.batches_per_epoch`` > 1), with the same results bit for bit. It gains the reward's time where the
    reward leaves the sampler free: a reward server's answer, a reward on another device. The reward must be safe
    to call from another thread (the built-in and remote ones are)."""


@dataclass
class SamplingSettings:
    scheduler: Literal["ddim", "ddpm", "flow"] = "ddim"
    """``ddim`` or ``ddpm`` for a Stable Diffusion (UNet) base; ``flow`` for a flow-matching base (SD3, FLUX,
    Qwen-Image): its own FlowMatchEulerDiscreteScheduler (and shift, or the dynamic shift of the image's size), stepped
    with Flow-GRPO's SDE."""
    num_inference_steps: int = 20
    eta: float = 1.0
    """DDIM's stochasticity (ddim only; DDPM steps are always eta 1)."""
    flow_noise_level: float = DEFAULT_FLOW_NOISE_LEVEL
    """The flow SDE's noise level a, sigma_t = a sqrt(t / (1 - t)) (flow only; Flow-GRPO's default 0.7)."""
    guidance_scale: float = 3.0
    """Classifier-free guidance (SD, SD3; Qwen-Image's true CFG, its ``true_cfg_scale``); for FLUX.1-dev the distilled
    guidance its transformer embeds (no negative branch, FluxPipeline's default 3.5); ignored by a transformer without
    guidance embeddings (FLUX.1-schnell)."""
    resolution: int | None = None
    """The images' side in pixels (square); None: the pipeline's default (the denoiser's sample size, FLUX's 1024)."""
    max_sequence_length: int | None = None
    """T5's token count for SD3 and FLUX prompts, and the text rows every Qwen-Image prompt is padded to; None: the
    pipeline's default (SD3 256, FLUX 512, Qwen-Image 512; Flow-GRPO encodes 128 for FLUX). Not a setting of Stable
    Diffusion's CLIP-only pipelines."""
    batch_size: int = 16
    """Trajectories per process per sampling batch."""
    batches_per_epoch: int = 2

    @property
    def noise_scale(self) -> float:
        """The scheduler's one noise setting (msdda.diffusion.sampler_kernel): the flow noise level a, or eta."""
        return self.flow_noise_level if self.scheduler == "flow" else self.eta


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class OptimSettings:
    learning_rate: float = 3e-4
    adam_weight_decay: float = 1e-4
    batch_size: int = 16
    """Trajectories per process per gradient step (each contributes all its steps)."""
    gradient_accumulation_steps: int = 1
    inner_epochs: int = 1
    timestep_fraction: float = 1.0
    """Share of each trajectory's steps trained per update, drawn at random (DDPO's timestep_fraction): the
    steps of one trajectory are correlated, so fewer of them from more trajectories buys more signal per
    gradient evaluation."""
    clip_range: float = 0.2
    advantage_clip: float = 5.0
    advantage_normalisation: Literal["center", "standardize"] = "center"
    state_baseline: bool = True
    """For tweedie/rollout step rewards, subtract the estimator at x_t (what the step inherited) first."""
    estimator: Literal["policy-gradient", "pathwise"] = "policy-gradient"
    """How the step objective's gradient is estimated. ``policy-gradient``: the clipped score-function update
    with per-prompt advantages (DDPO/DPOK; any reward). ``pathwise``: the step reward's own gradient through the
    reparameterised action x_{t-1} = mean + std * noise, through the step reward's reference continuation
    (needs ``reward.step_reward`` tweedie or rollout and a differentiable reward); the same objective and
    optimum, with a variance that does not grow with the latent dimension."""
    fresh_noise: bool = False
    """``pathwise`` only: every update draws its own action noise x_{t-1} = mean + std * noise instead of reusing the
    rollout's. Given the states, the pathwise step objective's gradient does not depend on the policy that visited
    them (no importance ratio), so with fresh noise an epoch's states serve many ``inner_epochs`` exactly: the
    state-replay mode, which samples trajectories (and calls the reward on them) far less often per update."""
    reuse_reward_gradients: bool = False
    """``pathwise`` only: take each transition's step-reward gradient once per epoch, at the action the rollout drew,
    and let every update of the epoch's ``inner_epochs`` maximise the step objective with the reward linearised there
    (the KL exact; msdda.train.pathwise). Its gradient at the epoch's policy is the pathwise one and its fixed points
    are the pathwise update's, so the optimum is the same; the reward and the step reward's reference continuation
    run once per transition and epoch instead of once per update, and the later updates cost the policy's forward
    and backward only. Pays with ``inner_epochs`` > 1, most with the ``rollout`` step reward. Not with
    ``fresh_noise`` (the reward is linearised at the rollout's own actions)."""
    proximal_weight: float = 1.0
    """With ``reuse_reward_gradients``: the weight, in units of beta, of |x_{t-1}(theta) - x_{t-1}|^2 / (2 s^2) (the KL
    from the epoch's kernel, for a fixed variance s^2) subtracted from the linearised reward, which keeps an epoch's
    updates where the linearisation holds. It and its gradient vanish at the epoch's policy, so the gradient there and
    the optimum stay the pathwise update's. The epochs converge where the reward's curvature c along the shift meets
    2 c s^2 / beta < 1 + 2 * proximal_weight, fastest at 2 c s^2 / beta = proximal_weight; 0: no proximal term."""
    reference_states: float = 0.0
    """Share of each epoch's sampling batches drawn from the reference (the adapter off) instead of the current
    adapter (``fresh_noise`` only): the gauge and fusion meet both distributions of states."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """The learning rate over the run's optimizer steps (diffusers.optimization.get_scheduler), after
    ``lr_warmup_steps`` of linear warm-up."""
    lr_warmup_steps: int = 0
    gauge_every: int = 0
    """Epochs between optimality gauges (msdda.train.gauge) during training, logged and kept in the history; 0: only
    the final one, written into the adapter's metadata (``gauge_prompts`` > 0)."""
    gauge_prompts: int = 8
    """Prompts whose held-out states (one trajectory each from the reference and from the adapter) the gauge reads;
    0: no gauge (it needs a differentiable reward; without one it is skipped)."""
    gauge_draws: int = 2
    """Draws of x_{t-1} per state that estimate E[grad R_t] for the gauge (at least 2: the estimate is bias-corrected
    with their spread)."""
    stop_near_optimum: float | None = None
    """Stop at the first gauge (``gauge_every``) at which every step that carries KL has |d| / |d*| within this
    tolerance of 1 (e.g. 0.1); None: train all ``epochs``."""
    step_scale_rounds: int = 0
    """Rounds of per-step scale calibration (msdda.step_scales, as ``msdda calibrate``) after the last epoch, on the
    gauge's prompts: the exported adapter carries a factor per step fitted to its restricted step optimum (0: none;
    it needs a differentiable reward and ``gauge_prompts`` > 0)."""
    stat_buffer: int = 32
    stat_min_count: int = 8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    single_pass: bool = False
    """Train on the sampling forward's own autograd graph instead of running each trained step's forward again
    in an update pass: one UNet forward fewer per trained transition, for holding every trained step's
    activations until the epoch's rewards are in (gradient checkpointing shrinks them). The same gradient as
    the update pass when the update is on-policy: estimator policy-gradient, inner_epochs 1 and one gradient
    step per epoch (train.batch_size * gradient_accumulation_steps = the epoch's trajectories per process)."""
    compile: bool = False
    """Run the sampling pass's UNet forwards (the policy's, with the adapter, and the reference's, without it)
    through ``torch.compile``. On the world's UNet on 2 CPU cores this makes an epoch of the single pass with the
    KL on 11-16% shorter, for about 35 s of compiling in the first epoch, so it pays off on long runs only. Needs
    what torch.compile needs: a C++ compiler on CPU, Triton on GPU. The update pass's forwards stay eager."""


@dataclass
class CheckpointSettings:
    every: int = 5
    """Epochs between checkpoints."""
    keep: int = 2
    """How many checkpoints to keep (oldest removed first)."""


@dataclass
class EmaSettings:
    decay: float | None = None
    """An exponential moving average of the adapter's weights, updated after every optimizer step with this decay
    (ramped in as min(decay, (1 + n) / (10 + n)) over the n steps since ``start_step``, as diffusers' EMAModel and
    Flow-GRPO's ema do); kept in checkpoints. None: no EMA."""
    start_step: int = 0
    """Optimizer steps before the EMA starts averaging; until then it follows the raw weights."""
    export: Literal["ema", "raw"] = "ema"
    """With ``decay`` set, which weights ``final/`` holds: the EMA's or the optimizer's raw ones. The other set is
    exported beside it (``final-raw/`` or ``final-ema/``), and each adapter's metadata says which it holds
    (``weights``), so evaluate and sweep can compare the two."""


@dataclass
class TrainConfig:
    base: str = "world"
    """A local diffusers folder, a Hub id, or 'world' for the embedded default."""
    prompts: list[str] | str = "world"
    """A list of prompts, a text file with one prompt per line, or 'world' for the world's training prompts."""
    output_dir: str = "runs/train"
    seed: int = 0
    epochs: int = 20
    beta: float = 0.01
    """KL weight of the step-level objective; recorded in the adapter for fusion."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    resume: str | None = None
    """'latest' or a checkpoint folder to continue from."""
    sample_every: int = 5
    """Epochs between sample grids (0: never)."""
    log_with: str | list[str] | None = "tensorboard"
    """The experiment tracker(s), written under ``output_dir/logs``: ``tensorboard``, ``wandb`` (its ``WANDB_MODE``,
    e.g. offline, is honoured), a list of both, or None. They get the epoch's losses, KL, rewards, the optimality
    gauge (``train.gauge_every``) and the sample grids (``sample_every``)."""
    process_group_timeout: float | None = None
    """Seconds a process waits in a collective (gather, all-reduce) for the others before it fails; None: torch's
    default (10 minutes with NCCL). Raise it where one process's reward calls can take longer than that (a slow
    reward server, a large VLM judge)."""
    max_bad_epochs: int = 3
    """Stop when every reward of a batch was NaN/inf for this many epochs in a row."""
    reward: RewardSettings = field(default_factory=RewardSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: OptimSettings = field(default_factory=OptimSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    ema: EmaSettings = field(default_factory=EmaSettings)

    def validate(self) -> None:
        """Refuse bad settings before any work; each message names the key and the fix."""
        from msdda.rewards import available_rewards

        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise UserError(f"beta must be a finite number >= 0 (the KL weight), got {self.beta}")
        if self.sampling.scheduler == "ddim" and not self.sampling.eta > 0:
            raise UserError(f"sampling.eta={self.sampling.eta} makes DDIM deterministic: step-level RL needs "
                             "Gaussian steps; set sampling.eta > 0 (1.0 is DDPM-like)")
        if self.sampling.scheduler == "flow" and not (self.sampling.flow_noise_level > 0
                                                      and math.isfinite(self.sampling.flow_noise_level)):
            raise UserError(f"sampling.flow_noise_level={self.sampling.flow_noise_level} must be a finite number > 0: "
                             "at 0 the flow step is the deterministic Euler (ODE) step and step-level RL needs Gaussian "
                             "steps; Flow-GRPO uses 0.7")
        if self.reward.name not in available_rewards() and ":" not in self.reward.name:
            raise UserError(f"unknown reward {self.reward.name!r}; built-in rewards are {available_rewards()}, "
                             "or give 'package.module:name'")
        check_prompts_spec(self.prompts)
        for name, value in (("epochs", self.epochs), ("sampling.batch_size", self.sampling.batch_size),
                            ("sampling.batches_per_epoch", self.sampling.batches_per_epoch),
                            ("sampling.num_inference_steps", self.sampling.num_inference_steps),
                            ("train.batch_size", self.train.batch_size), ("lora.rank", self.lora.rank),
                            ("sampling.resolution", 1 if self.sampling.resolution is None else self.sampling.resolution),
                            ("sampling.max_sequence_length", self.sampling.max_sequence_length or 1),
                            ("checkpoint.every", self.checkpoint.every), ("checkpoint.keep", self.checkpoint.keep)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.train.estimator == "pathwise" and self.reward.step_reward == "terminal":
            raise UserError("train.estimator=pathwise differentiates the tweedie or rollout step reward; got "
                             "reward.step_reward='terminal': set reward.step_reward=tweedie (or rollout) or use "
                             "train.estimator=policy-gradient")
        if self.train.compile and self.train.gradient_checkpointing:
            raise UserError("train.compile does not run with train.gradient_checkpointing (its recomputation keeps "
                             "the adapter routing through a hook torch.compile does not trace): set one of them false")
        if not 0 < self.train.timestep_fraction <= 1:
            raise UserError(f"train.timestep_fraction must be in (0, 1], got {self.train.timestep_fraction}")
        per_epoch = self.sampling.batch_size * self.sampling.batches_per_epoch
        if per_epoch % self.train.batch_size:
            raise UserError(f"train.batch_size={self.train.batch_size} must divide the trajectories sampled per "
                             f"epoch (sampling.batch_size * sampling.batches_per_epoch = {per_epoch})")
        if self.train.single_pass:
            self._check_single_pass(per_epoch)
        self._check_replay()
        self._check_ema_and_processes()

    @property
    def trackers(self) -> list[str]:
        """``log_with`` as a list (empty: no tracker)."""
        if self.log_with is None:
            return []
        return [self.log_with] if isinstance(self.log_with, str) else list(self.log_with)

    def _check_ema_and_processes(self) -> None:
        ema = self.ema
        if ema.decay is not None and not 0 < ema.decay < 1:
            raise UserError(f"ema.decay must be in (0, 1) (e.g. 0.9 or 0.999; a larger one averages over more "
                            f"steps), got {ema.decay}; or unset it for no EMA")
        if ema.start_step < 0:
            raise UserError(f"ema.start_step must be at least 0, got {ema.start_step}")
        if self.process_group_timeout is not None and not (self.process_group_timeout > 0
                                                           and math.isfinite(self.process_group_timeout)):
            raise UserError(f"process_group_timeout must be a number of seconds > 0, got {self.process_group_timeout}; "
                            "or unset it for torch's default")
        unknown = [name for name in self.trackers if name not in TRACKERS]
        if unknown:
            raise UserError(f"log_with={self.log_with!r}: unknown tracker(s) {unknown}; use {list(TRACKERS)}, a list "
                            "of them, or null")
        if "wandb" in self.trackers:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise UserError("log_with names wandb, which is not installed: pip install wandb (msdda's test extra "
                                "pins it), or log with tensorboard")

    def _check_replay(self) -> None:
        train = self.train
        if train.fresh_noise and train.estimator != "pathwise":
            raise UserError(f"train.fresh_noise draws new action noise for the pathwise update; got train.estimator="
                             f"{train.estimator!r}: set train.estimator=pathwise or train.fresh_noise=false")
        if train.reuse_reward_gradients and (train.estimator != "pathwise" or train.fresh_noise):
            raise UserError(f"train.reuse_reward_gradients linearises the pathwise step reward at the rollout's own "
                            f"actions; got train.estimator={train.estimator!r}, train.fresh_noise={train.fresh_noise}: "
                            "set train.estimator=pathwise and train.fresh_noise=false, or "
                            "train.reuse_reward_gradients=false")
        if not (train.proximal_weight >= 0 and math.isfinite(train.proximal_weight)):
            raise UserError(f"train.proximal_weight must be a finite number >= 0 (in units of beta; 0: no proximal "
                            f"term), got {train.proximal_weight}")
        if not 0 <= train.reference_states <= 1 or (train.reference_states and not train.fresh_noise):
            raise UserError(f"train.reference_states={train.reference_states} must be in [0, 1], and above 0 only "
                             "with train.fresh_noise=true (the policy gradient and the rollout's own noise need the "
                             "adapter's samples)")
        for name, value in (("train.lr_warmup_steps", train.lr_warmup_steps), ("train.gauge_every", train.gauge_every),
                            ("train.gauge_prompts", train.gauge_prompts),
                            ("train.step_scale_rounds", train.step_scale_rounds)):
            if value < 0:
                raise UserError(f"{name} must be at least 0, got {value}")
        if train.gauge_draws < 2:
            raise UserError(f"train.gauge_draws must be at least 2 (the gauge corrects its estimate with the draws' "
                             f"spread), got {train.gauge_draws}")
        if train.stop_near_optimum is not None and not (train.stop_near_optimum > 0 and train.gauge_every > 0
                                                        and train.gauge_prompts > 0):
            raise UserError(f"train.stop_near_optimum={train.stop_near_optimum} needs a tolerance > 0 and gauges to "
                             "read: set train.gauge_every >= 1 and train.gauge_prompts >= 1")
        if train.step_scale_rounds and not train.gauge_prompts:
            raise UserError(f"train.step_scale_rounds={train.step_scale_rounds} fits the per-step scales on the gauge's "
                             "prompts: set train.gauge_prompts >= 1")

    def _check_single_pass(self, per_epoch: int) -> None:
        train = self.train
        if train.estimator != "policy-gradient":
            raise UserError(f"train.single_pass needs train.estimator=policy-gradient, got {train.estimator!r}: the "
                             "pathwise update differentiates the reward, which the sampling pass does not; set "
                             "train.single_pass=false")
        if train.inner_epochs != 1:
            raise UserError(f"train.single_pass trains once on the sampling pass's graph, but train.inner_epochs="
                             f"{train.inner_epochs}: set train.inner_epochs=1 or train.single_pass=false")
        if train.batch_size * train.gradient_accumulation_steps != per_epoch:
            raise UserError(
                f"train.single_pass takes one gradient step per epoch, but train.batch_size * "
                f"train.gradient_accumulation_steps = {train.batch_size * train.gradient_accumulation_steps} is not "
                f"the {per_epoch} trajectories sampled per epoch: set train.gradient_accumulation_steps="
                f"{per_epoch // train.batch_size}, or train.single_pass=false")

    @property
    def optimizer_steps(self) -> int:
        """The run's optimizer steps, which the learning-rate schedule spans: one per row batch of every inner epoch
        (all its trained steps accumulate into it), or one per epoch with ``single_pass``."""
        if self.train.single_pass:
            return self.epochs
        per_epoch = self.sampling.batch_size * self.sampling.batches_per_epoch // self.train.batch_size
        return self.epochs * self.train.inner_epochs * per_epoch // self.train.gradient_accumulation_steps

    @property
    def trained_steps(self) -> int:
        """Steps of each trajectory trained per update (one backward each)."""
        return max(1, round(self.train.timestep_fraction * self.sampling.num_inference_steps))

    def load_prompts(self) -> list[str]:
        return load_prompts(self.prompts)
