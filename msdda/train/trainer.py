"""The Accelerate trainer: one LoRA per reward with step-level KL-regularised RL.

An epoch samples trajectories with the current adapter (msdda.train.rollout), turns step rewards into
per-prompt advantages over all processes' samples (msdda.train.advantages), then updates the adapter with the
configured estimator: the clipped policy gradient with the exact KL to the reference (msdda.train.policy_gradient,
or msdda.train.single_pass on the sampling graph), or the step reward's pathwise gradient (msdda.train.pathwise).
Every random draw comes from a generator seeded by (seed, epoch, process, batch), and checkpoints hold
everything else that changes (msdda.train.checkpoint), so a run resumed from a checkpoint ends with the same
weights as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from msdda.adapters import AdapterMetadata, save_adapter, weights_hash
from msdda.config import config_to_dict
from msdda.diffusion import decode_latents, denoiser_of, encode_prompts, images_to_pil, latent_shape
from msdda.errors import UserError
from msdda.kernels import StepKernel
from msdda.models import family_of
from msdda.prompts import load_prompts
from msdda.rewards import Reward, load_reward
from msdda.rewards.remote import RewardUnavailable
from msdda.train.advantages import PerPromptStatTracker, per_prompt_advantages
from msdda.train.checkpoint import (
    RUN_CONFIG,
    check_output_dir,
    latest_checkpoint,
    load_checkpoint,
    lora_state,
    resume_folder,
    save_checkpoint,
)
from msdda.train.config import TrainConfig
from msdda.train.ema import EMA_FILE, build_ema, ema_from_files, ema_to_files, ema_weights, ema_weights_in
from msdda.train.distributed import (
    build_accelerator,
    check_launch,
    configure_deepspeed,
    gather_rows,
    own_rows,
    uses_deepspeed,
    uses_fsdp,
)
from msdda.step_scales import register_step_scales
from msdda.train.calibrate import calibrate_step_scales
from msdda.train.gauge import GaugeSettings, gauge_adapter, near_optimum
from msdda.train.loss import StepLoss
from msdda.train.pathwise import (
    StepRewardFunction,
    linearised_pathwise_loss,
    pathwise_loss,
    reference_step_reward,
    step_reward_gradients,
)
from msdda.train.policy import load_policy
from msdda.train.policy_gradient import policy_gradient_loss
from msdda.train.rollout import Conditioning, Sampler, Trajectories, sample_rollout
from msdda.train.scoring import RolloutScorer
from msdda.train.single_pass import single_pass_update
from msdda.train.updates import Learner, Transitions, update_pass

__all__ = ["Trainer", "train", "latest_checkpoint"]

logger = logging.getLogger(__name__)

WANDB_RUN_ID = "wandb_run_id"
"""The file in a run's logs/ that holds the id of its wandb run."""


def _seed(*parts: int) -> int:
    """A generator seed for one draw, named by its parts (seed, epoch, process, batch, which draw)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _training_reward(config: TrainConfig, device: torch.device) -> Reward:
    """The configured reward on ``device``, refused before any work where the estimator cannot use it."""
    reward = load_reward(config.reward.name, **config.reward.kwargs).to(device)
    for key, value in (("stop_near_optimum", config.train.stop_near_optimum),
                       ("step_scale_rounds", config.train.step_scale_rounds or None)):
        if value is not None and not reward.differentiable:
            raise UserError(f"train.{key} reads the optimality gauge, which differentiates the reward; "
                             f"{reward.name!r} is not differentiable: unset train.{key}")
    if config.train.estimator == "pathwise" and not reward.differentiable:
        raise UserError(f"train.estimator=pathwise needs a differentiable reward; {reward.name!r} is not "
                         "(its class does not set differentiable = True): use train.estimator=policy-gradient")
    return reward


class Trainer:
    """Builds everything from a TrainConfig, refusing bad input before any work, then ``run()``s."""

    def __init__(self, config: TrainConfig) -> None:
        from accelerate.utils import set_seed

        config.validate()
        check_launch(config)
        self.config, self.output_dir = config, Path(config.output_dir)
        check_output_dir(self.output_dir, config.resume)
        self.prompts = config.load_prompts()
        self.accelerator = build_accelerator(config)
        set_seed(config.seed, device_specific=True)  # before the adapter's random initialisation
        self.reward = _training_reward(config, self.accelerator.device)
        deepspeed, fsdp = uses_deepspeed(self.accelerator), uses_fsdp(self.accelerator)
        self.policy = load_policy(config, self.accelerator.device, channels_last=not (deepspeed or fsdp))
        optimizer = torch.optim.AdamW(self.policy.lora_parameters, lr=config.train.learning_rate,
                                      weight_decay=config.train.adam_weight_decay)
        if deepspeed:
            configure_deepspeed(self.accelerator, config)
        unet, optimizer = self.accelerator.prepare(denoiser_of(self.policy.pipeline), optimizer)
        # FSDP2 replaces each parameter by a sharded one (the optimizer's are swapped too): clip and average those
        self.policy.lora_parameters = [p for p in unet.parameters() if p.requires_grad]
        self.learner = Learner(self.accelerator, unet, optimizer, self.policy.lora_parameters,
                               config.train.max_grad_norm, _lr_schedule(config, optimizer),
                               ema=build_ema(self.policy.lora_parameters, config.ema))
        self.trained_names = [name for name, p in self.unwrapped.named_parameters() if p.requires_grad]
        """The names of ``policy.lora_parameters``, in their order (the EMA's checkpoint keys)."""
        self.tracker = PerPromptStatTracker(config.train.stat_buffer, config.train.stat_min_count,
                                            config.train.advantage_normalisation)
        self.start_epoch, self.bad_epochs, self.history = 0, 0, []
        self.saved_epochs = 0
        """The epochs the newest checkpoint holds."""
        self.last_gauge: dict | None = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The trained denoiser (with its adapter) outside any distributed wrapper."""
        return self.accelerator.unwrap_model(self.learner.model)

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> Path:
        """Train (resuming if asked), checkpoint, and export the final adapter; returns its folder."""
        config, accelerator = self.config, self.accelerator
        checkpoint = None if config.resume is None else resume_folder(self.output_dir, config.resume)
        if checkpoint is not None:
            self._resume(checkpoint)
        elif config.resume is not None:
            logger.warning("%s stopped before its first complete checkpoint; training it from the beginning",
                           self.output_dir)
        self._record_run(resumed=config.resume is not None)
        progress = tqdm(range(self.start_epoch, config.epochs), desc="epochs", initial=self.start_epoch,
                        total=config.epochs, disable=not accelerator.is_local_main_process)
        on_cuda = accelerator.device.type == "cuda"
        for epoch in progress:
            started = time.time()
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(accelerator.device)
            trajectories = self._sample_or_stop(epoch)
            advantages = self.advantages(trajectories)
            finite_rewards = accelerator.gather(trajectories.final_rewards.to(accelerator.device)).cpu()
            finite_rewards = finite_rewards[torch.isfinite(finite_rewards)]
            dropped = self._dropped_samples(advantages)
            if self._all_dropped(dropped, epoch, progress):
                continue
            metrics = self.update(epoch, trajectories, advantages)
            metrics.update(reward_mean=float(finite_rewards.mean()), reward_std=float(finite_rewards.std()),
                           dropped_samples=dropped, epoch_seconds=time.time() - started)
            if on_cuda:  # what this process's GPU needed at most, to size train.batch_size (docs/training.md)
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            near = False
            if config.train.gauge_every and (epoch + 1) % config.train.gauge_every == 0:
                near = self._gauge_epoch(metrics)
            self.history.append({"epoch": epoch + 1, **metrics})
            self._report(epoch, metrics, progress)
            if (epoch + 1) % config.checkpoint.every == 0 or epoch + 1 == config.epochs or near:
                self._save_checkpoint(epoch)
            if config.sample_every and (epoch + 1) % config.sample_every == 0 and (
                    accelerator.is_main_process or uses_fsdp(accelerator)):  # FSDP2's forwards gather on every process
                self._sample_grid(epoch)
            if near:
                logger.info("every step that carries KL is within %s of its step optimum after epoch %d; stopping",
                            config.train.stop_near_optimum, epoch + 1)
                break
        return self._export()

    def sample(self, epoch: int) -> Trajectories:
        """This process's trajectories of ``epoch``: ``sampling.batches_per_epoch`` batches of random prompts,
        each step recorded as the estimator needs it (the pathwise update recomputes the step rewards with grad,
        from the noise draws; ``single_pass`` keeps the graphs of its trained steps)."""
        config, device, process = self.config, self.accelerator.device, self.accelerator.process_index
        pathwise, pipeline = config.train.estimator == "pathwise", self.policy.pipeline
        reference_batches = round(config.train.reference_states * config.sampling.batches_per_epoch)
        sampler = Sampler.of(pipeline, self.policy.sampling_unet, config.sampling, self.policy.reference_unet)
        reference_sampler = dataclasses.replace(sampler, unet=self.unwrapped)  # its adapter off (_adapter_off)
        self.unwrapped.eval()
        with RolloutScorer(self.reward, config.reward.score_while_sampling) as scorer:  # msdda.train.scoring
            for batch_index in range(config.sampling.batches_per_epoch):
                from_reference = batch_index < reference_batches
                rng = np.random.default_rng(_seed(config.seed, epoch, process, batch_index, 1))
                prompts = [self.prompts[i] for i in rng.integers(0, len(self.prompts), config.sampling.batch_size)]
                positive, negative = encode_prompts(pipeline, prompts, device,
                                                    guidance_scale=config.sampling.guidance_scale,
                                                    max_sequence_length=config.sampling.max_sequence_length,
                                                    size=(config.sampling.resolution, config.sampling.resolution))
                generator = torch.Generator().manual_seed(_seed(config.seed, epoch, process, batch_index, 2))
                with self._adapter_off() if from_reference else nullcontext():
                    scorer.submit(sample_rollout(
                        reference_sampler if from_reference else sampler, Conditioning(prompts, positive, negative),
                        "terminal" if pathwise else config.reward.step_reward, generator,
                        need_reference=config.beta > 0, keep_noises=pathwise and not config.train.fresh_noise,
                        graph_steps=self._graph_steps(epoch, batch_index) if config.train.single_pass else None))
            return _concatenate(scorer.results())

    def _sample_or_stop(self, epoch: int) -> Trajectories:
        """``sample(epoch)``; where a reward server gave no usable answer on any process, every process saves the
        state the epoch started from (unless a checkpoint holds it) and the run stops with the fault, to resume from
        there with the result an uninterrupted run would have had."""
        fault = None
        try:
            trajectories = self.sample(epoch)
        except RewardUnavailable as error:
            fault = error
        flag = torch.tensor(int(fault is not None), device=self.accelerator.device)
        if not int(self.accelerator.reduce(flag, reduction="sum")):  # every process takes the same branch
            return trajectories
        if epoch > self.saved_epochs:
            self._save_checkpoint(epoch - 1)
        saved = (f"its state after epoch {epoch} is in {latest_checkpoint(self.output_dir)}" if epoch else
                 "no epoch had finished")
        raise RewardUnavailable(f"{fault or 'another process got no rewards from its reward server'}. The run stopped "
                                f"in epoch {epoch + 1}; {saved}: when the server answers again, run the same command "
                                "with --resume (resume=latest) to go on with the same result") from fault

    @contextmanager
    def _adapter_off(self):
        """The denoiser as the reference while sampling a batch of reference states (``train.reference_states``)."""
        self.unwrapped.disable_adapters()
        try:
            yield
        finally:
            self.unwrapped.enable_adapters()

    def gauge(self) -> dict | None:
        """The optimality gauge (msdda.train.gauge) of the adapter as it is now, on held-out states of
        ``train.gauge_prompts`` training prompts; None where it is off or the reward has no gradient."""
        config = self.config
        count = config.train.gauge_prompts
        if not count or not self.reward.differentiable:
            return None
        adapter = next(iter(self.unwrapped.peft_config))
        self.unwrapped.eval()
        return gauge_adapter(self.policy.pipeline, self.unwrapped, adapter, self.reward, self._metadata(),
                             self._gauge_settings())

    def _fitted(self, gauge: dict | None) -> tuple[dict | None, list | None]:
        """(the gauge, the per-step scales) to export with the adapter's weights as they are now: with
        ``train.step_scale_rounds``, the scales fitted to them (msdda.train.calibrate) and the gauge at those scales,
        left unregistered so that other weights (the EMA's) are fitted from scale 1."""
        if not self.config.train.step_scale_rounds or gauge is None:
            return gauge, None
        adapter = next(iter(self.unwrapped.peft_config))
        scales, gauge = calibrate_step_scales(self.policy.pipeline, self.unwrapped, adapter, self.reward,
                                              self._metadata(), self._gauge_settings(), self.config.beta,
                                              self.config.train.step_scale_rounds, gauge=gauge)
        register_step_scales(self.unwrapped, adapter, None)
        return gauge, scales

    def _gauge_settings(self) -> GaugeSettings:
        """The gauge's held-out states: ``train.gauge_prompts`` of the training prompts, evenly spaced."""
        count = self.config.train.gauge_prompts
        return GaugeSettings(prompts=load_prompts(self.prompts, count), draws=self.config.train.gauge_draws,
                             batch_size=count)

    def _gauge_epoch(self, metrics: dict) -> bool:
        """Gauge the adapter into ``metrics``; whether it is near its optimum by ``train.stop_near_optimum``."""
        self.last_gauge = self.gauge()
        if self.last_gauge is None:
            return False
        metrics.update(gauge_max_ratio_deviation=self.last_gauge["max_ratio_deviation"],
                       gauge_implied_beta=self.last_gauge["implied_beta"],
                       gauge_max_scale_deviation=self.last_gauge["max_scale_deviation"],
                       gauge_scale_beta=self.last_gauge["scale_beta"])
        tolerance = self.config.train.stop_near_optimum
        return tolerance is not None and near_optimum(self.last_gauge, tolerance)

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        """``[B, T]`` advantages of this process's trajectories, on the CPU, with NaN rows for dropped samples
        (a non-finite reward). The pathwise update trains on the reward itself: its advantages are zeros, kept
        only to mark the dropped rows."""
        config = self.config
        if config.train.estimator == "pathwise":
            finite = torch.isfinite(trajectories.final_rewards).cpu()
            return torch.where(finite, 0.0, torch.nan)[:, None].expand(-1, len(trajectories.timesteps))
        rewards = trajectories.step_rewards.cpu().double()
        if trajectories.state_values is not None and config.train.state_baseline:
            rewards = rewards - trajectories.state_values.cpu().double()
        all_rewards, all_prompts = gather_rows(self.accelerator, rewards, trajectories.prompts)
        advantages = per_prompt_advantages(all_rewards, all_prompts, self.tracker, config.reward.step_reward)
        return torch.as_tensor(own_rows(self.accelerator, advantages, len(trajectories.prompts)), dtype=torch.float32)

    def update(self, epoch: int, trajectories: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        """Train the adapter on the epoch's trajectories; returns the epoch's mean loss terms."""
        config = self.config
        if config.train.single_pass:
            means = single_pass_update(trajectories, advantages, config, self.learner)
        else:
            # under FSDP2 every forward gathers weights from all processes, so they must run the same forwards: the
            # same steps in the same order (a step's continuation has as many forwards as steps follow it)
            process = 0 if uses_fsdp(self.accelerator) else self.accelerator.process_index
            seeds = [_seed(config.seed, epoch, process, inner, 3) for inner in range(config.train.inner_epochs)]
            if config.train.reuse_reward_gradients:  # the reward's gradients at the epoch's actions, taken once
                self.unwrapped.eval()
                trajectories = dataclasses.replace(trajectories, reward_gradients=step_reward_gradients(
                    trajectories, self.step_reward(), config.train.batch_size))
            means = update_pass(self.step_loss, trajectories, advantages, config, self.learner, seeds)
        if not math.isfinite(means["loss"]):  # before this epoch's checkpoint: the last one written stays the last good
            raise UserError(f"the loss became {means['loss']} at epoch {epoch + 1}; stopping. The last good "
                               f"checkpoint is {latest_checkpoint(self.output_dir)}. Lower train.learning_rate or "
                               "raise beta")
        return means

    def step_loss(self, batch: Transitions) -> StepLoss:
        """The configured estimator's loss of ``batch`` under the current adapter (the update pass's unit)."""
        if self.config.train.reuse_reward_gradients:
            return linearised_pathwise_loss(self.policy_kernel, batch, self.config)
        if self.config.train.estimator == "pathwise":
            return pathwise_loss(self.policy_kernel, batch, self.config, self.step_reward())
        return policy_gradient_loss(self.policy_kernel, batch, self.config)

    def step_reward(self, step_reward: str | None = None) -> StepRewardFunction:
        """The step reward R_t(x_{t-1}) of the configured rule (or ``step_reward``), differentiable in the action
        through the frozen reference."""
        return reference_step_reward(Sampler.of(self.policy.pipeline, self.unwrapped, self.config.sampling),
                                     self.reward, step_reward or self.config.reward.step_reward)

    def policy_kernel(self, batch: Transitions) -> StepKernel:
        """pi_theta(. | x_t) at the batch's x_t (with grad): the trained denoiser through the rollout's own
        ``Sampler.policy_kernel``, so that on-policy pi_theta is the recorded pi_old bit for bit (for the rows as they
        were sampled together; a subset of them may run other CPU kernels, equal to float rounding)."""
        sampler = Sampler.of(self.policy.pipeline, self.learner.model, self.config.sampling)
        return sampler.policy_kernel(batch.latents, batch.timestep, batch.prompt_embeds, batch.negative_embeds)

    # ------------------------------------------------------------------------------------------ the epoch's parts
    def _graph_steps(self, epoch: int, batch_index: int) -> torch.Tensor:
        """The steps of one sampling batch that train (``train.single_pass``): timestep_fraction of them, at random."""
        config, steps = self.config, self.config.sampling.num_inference_steps
        generator = torch.Generator().manual_seed(
            _seed(config.seed, epoch, self.accelerator.process_index, batch_index, 4))
        chosen = torch.zeros(steps, dtype=torch.bool)
        chosen[torch.randperm(steps, generator=generator)[:config.trained_steps]] = True
        return chosen

    def _dropped_samples(self, advantages: torch.Tensor) -> int:
        """How many of the epoch's samples, over all processes, a non-finite reward dropped."""
        dropped = (~torch.isfinite(advantages).all(dim=1)).sum().to(self.accelerator.device)
        return int(self.accelerator.reduce(dropped, reduction="sum"))

    def _all_dropped(self, dropped: int, epoch: int, progress) -> bool:
        """Whether the reward dropped every sample of the epoch, which then trains nothing; too many such epochs
        in a row stop the run."""
        sampling = self.config.sampling
        samples = sampling.batch_size * sampling.batches_per_epoch * self.accelerator.num_processes
        if dropped < samples:
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.config.max_bad_epochs:
            raise UserError(
                f"the reward {self.reward.name!r} returned NaN or inf for all {samples} samples of each of the last "
                f"{self.bad_epochs} epochs (max_bad_epochs={self.config.max_bad_epochs}); stopping. Make it return a "
                "finite score for the images it is given (NaN for a few drops just those samples): call it on a "
                "few samples of these prompts to see why it fails")
        self._report(epoch, {"dropped_samples": dropped}, progress)
        return True

    def _report(self, epoch: int, metrics: dict[str, float], progress) -> None:
        """Log the epoch's metrics (TensorBoard or the configured tracker) and show them on the progress bar."""
        if self.config.trackers:
            self.accelerator.log(metrics, step=epoch + 1)
        shown = {"reward": f"{metrics['reward_mean']:.3f}", "kl": f"{metrics['kl']:.3f}"} if "kl" in metrics else {}
        progress.set_postfix(**shown, dropped=metrics["dropped_samples"])

    # ------------------------------------------------------------------------------------ files and export
    def _record_run(self, resumed: bool) -> None:
        """Write the run's config beside its checkpoints, and start the trackers (a resumed run logs on in its wandb
        run)."""
        config = self.config
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / RUN_CONFIG).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        if config.trackers:
            flat = {k: str(v) if isinstance(v, (list, dict)) or v is None else v
                    for k, v in _flatten(config_to_dict(config)).items()}
            # wandb's run files go under the run's logs/ (its own default is ./wandb in the working directory)
            wandb = {"dir": str(self.output_dir / "logs"), "name": self.output_dir.name}
            if "wandb" in config.trackers and self.accelerator.is_main_process:
                wandb.update(id=self._wandb_run_id(resumed), resume="allow")
            self.accelerator.init_trackers("msdda-train", config=flat, init_kwargs={"wandb": wandb})

    def _wandb_run_id(self, resumed: bool) -> str:
        """The id of the run's wandb run, kept in its logs/: a resumed run reuses it, so that its epochs continue the
        same wandb run; a new run gets a new one."""
        path = self.output_dir / "logs" / WANDB_RUN_ID
        if resumed and path.is_file():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:8]  # wandb's own ids are 8 lowercase letters and digits
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
        return run_id

    def _save_checkpoint(self, epoch: int) -> None:
        state = {"epoch": epoch + 1, "bad_epochs": self.bad_epochs, "history": self.history,
                 "tracker": self.tracker.state_dict(), "optimizer_steps": self.learner.optimizer_steps}
        tensor_files = {}
        if self.learner.ema is not None:
            tensor_files[EMA_FILE], state["ema"] = ema_to_files(self.learner.ema, self.trained_names)
        save_checkpoint(self.output_dir, epoch, self.accelerator, self.learner.model, self.learner.optimizer, state,
                        self._metadata(), self.config.checkpoint.keep, tensor_files)
        self.saved_epochs = epoch + 1

    def _resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, self.accelerator, self.learner.model, self.learner.optimizer,
                                self.policy.lora_parameters)
        if self.learner.ema is not None:
            ema_from_files(self.learner.ema, self.trained_names, checkpoint, state.get("ema"))
        self.tracker.load_state_dict(state["tracker"])
        self.start_epoch, self.bad_epochs, self.history = state["epoch"], state["bad_epochs"], state["history"]
        self.saved_epochs = self.start_epoch
        self.learner.resume_schedule(state.get("optimizer_steps", 0))
        logger.info("resumed from %s at epoch %d", checkpoint, self.start_epoch)

    def _export(self) -> Path:
        """Check that only the LoRA trained, write the final adapter (``final/``; with an EMA, the weights
        ``ema.export`` names, and the other set beside it in ``final-raw/`` or ``final-ema/``), each with its own
        optimality gauge, and close the trackers."""
        if weights_hash(self.unwrapped) != self.policy.frozen_hash:
            raise RuntimeError("the base denoiser's weights changed during training; only the LoRA may train")
        gauged_now = self.history and "gauge_max_ratio_deviation" in self.history[-1] and self.last_gauge is not None
        exports = {"raw": (lora_state(self.accelerator, self.learner.model),
                           *self._fitted(self.last_gauge if gauged_now else self.gauge()))}
        ema = self.learner.ema
        if ema is not None:
            with ema_weights_in(ema, self.policy.lora_parameters):
                exports["ema"] = (lora_state(self.accelerator, self.learner.model,
                                             ema_weights(ema, self.trained_names)), *self._fitted(self.gauge()))
        chosen = self.config.ema.export if ema is not None else "raw"
        if self.accelerator.is_main_process:
            for weights, (lora, optimality, scales) in exports.items():
                metadata = dataclasses.replace(self._metadata(), optimality=optimality, weights=weights,
                                               step_scales=scales)
                folder = self.output_dir / ("final" if weights == chosen else f"final-{weights}")
                save_adapter(folder, self.unwrapped, metadata, lora)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.output_dir / "final"

    def _metadata(self) -> AdapterMetadata:
        config, pipeline = self.config, self.policy.pipeline
        scheduler, family = pipeline.scheduler, family_of(pipeline)
        resolution = config.sampling.resolution
        sampler = family.sampler_metadata(pipeline, config.sampling.noise_scale,
                                          latent_shape(pipeline, 1, resolution, resolution),
                                          config.sampling.num_inference_steps)
        last = self.history[-1] if self.history else {}
        return AdapterMetadata(
            pipeline_class=family.name, resolution=resolution,
            max_sequence_length=config.sampling.max_sequence_length, **sampler,
            reward_name=self.reward.name, reward_version=self.reward.version, reward_spec=config.reward.name,
            reward_kwargs=self.reward.reload_kwargs(config.reward.kwargs), beta=config.beta,
            step_reward=config.reward.step_reward, base_model=config.base, base_model_hash=self.policy.base_hash,
            scheduler_class=type(scheduler).__name__, scheduler_config=dict(scheduler.config),
            num_inference_steps=config.sampling.num_inference_steps,
            guidance_scale=config.sampling.guidance_scale, lora_rank=config.lora.rank, lora_alpha=config.lora.alpha,
            lora_target_modules=list(config.lora.target_modules),
            training={"epochs": len(self.history), "seed": config.seed, "processes": self.accelerator.num_processes,
                      "distributed_type": self.accelerator.distributed_type.value,
                      "trajectories_per_epoch": config.sampling.batch_size * config.sampling.batches_per_epoch
                      * self.accelerator.num_processes,
                      "first_reward_mean": self.history[0]["reward_mean"] if self.history else None,
                      "last_reward_mean": last.get("reward_mean"), "last_kl": last.get("kl"),
                      "ema": None if config.ema.decay is None else {"decay": config.ema.decay,
                                                                    "start_step": config.ema.start_step}},
        )

    def _sample_grid(self, epoch: int) -> None:
        """Sample the grid of up to 8 training prompts at the run's seed, and write it to samples/ and the trackers
        (the main process; under FSDP2 every process samples, as its forwards gather the weights)."""
        from msdda.utils import image_grid

        prompts = self.prompts[:: max(1, len(self.prompts) // 8)][:8]
        pipeline = self.policy.pipeline
        sampling = self.config.sampling
        positive, negative = encode_prompts(pipeline, prompts, self.accelerator.device,
                                            guidance_scale=sampling.guidance_scale,
                                            max_sequence_length=sampling.max_sequence_length,
                                            size=(sampling.resolution, sampling.resolution))
        self.unwrapped.eval()
        # decoded without the reward: a grid needs no scores, and a remote reward's failure here, on one process
        # alone, would leave the others waiting
        rollout = sample_rollout(Sampler.of(pipeline, self.unwrapped, sampling),
                                 Conditioning(prompts, positive, negative), "terminal",
                                 torch.Generator().manual_seed(self.config.seed))
        images = decode_latents(pipeline, rollout.final_latents)
        if not self.accelerator.is_main_process:
            return
        pil = images_to_pil(pipeline, images)
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid = image_grid(pil, columns=len(pil))
        grid.save(folder / f"epoch-{epoch + 1:05d}.png")
        for tracker in self.accelerator.trackers:  # one image per grid, at the epoch's step
            pixels = np.asarray(grid.convert("RGB"))[None]
            options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({"samples": pixels}, step=epoch + 1, **options)


def _lr_schedule(config: TrainConfig, optimizer):
    """diffusers' learning-rate schedule ``train.lr_schedule`` over the run's optimizer steps, or None for a constant
    rate without warm-up (the optimizer's own)."""
    if config.train.lr_schedule == "constant" and not config.train.lr_warmup_steps:
        return None
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.train.lr_schedule, optimizer, num_warmup_steps=config.train.lr_warmup_steps,
                         num_training_steps=config.optimizer_steps)


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _concatenate(batches: list[Trajectories]) -> Trajectories:
    """One Trajectories of an epoch's sampling batches (which share their schedule)."""
    if len(batches) == 1:
        return batches[0]

    def joined(name: str):
        parts = [getattr(batch, name) for batch in batches]
        if name in ("timesteps", "stochastic") or parts[0] is None:
            return parts[0]
        return [item for part in parts for item in part] if isinstance(parts[0], list) else torch.cat(parts)

    return Trajectories(**{field.name: joined(field.name) for field in dataclasses.fields(Trajectories)})


def train(config: TrainConfig) -> Path:
    """Train one adapter as ``config`` says; returns the final adapter folder."""
    return Trainer(config).run()
