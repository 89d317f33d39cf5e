"""The Accelerate trainer: one LoRA per reward with step-level KL-regularised RL.

An epoch samples trajectories with the current adapter (msdda.train.rollout), turns step rewards into
per-prompt advantages (gathered over processes), then takes clipped policy-gradient steps with the exact KL to
the reference (msdda.train.loss). Every random draw comes from a generator seeded by (seed, epoch, process,
batch), and checkpoints hold everything else that changes (LoRA weights, optimizer state, reward statistics),
so a run resumed from a checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from msdda.adapters import AdapterMetadata, save_adapter, weights_hash
from msdda.config import config_to_dict
from msdda.diffusion import (
    BASE,
    adapter_kernels,
    checkpoint_keeping_adapter_routing,
    decode_latents,
    encode_prompts,
    guided_output,
    images_to_pil,
    load_base_pipeline,
)
from msdda.kernels import StepKernel, kernel_kl, step_kernel
from msdda.rewards import load_reward
from msdda.train.config import TrainConfig
from msdda.train.loss import PerPromptStatTracker, pathwise_step_loss, step_loss
from msdda.train.rollout import Trajectories, reference_continuation, sample_trajectories

__all__ = ["Trainer", "train", "latest_checkpoint"]

logger = logging.getLogger(__name__)
RUN_CONFIG = "run_config.yaml"
STATE_FILE = "trainer_state.json"
LOGGED_TERMS = ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl")
"""The StepLoss fields an epoch logs, averaged over its updates."""
DEEPSPEED_STATE = "deepspeed"  # Accelerate's save_state folder; DeepSpeed's own (torch.save) format, written by this run


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (half-written ones end in .tmp and are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    complete = sorted(p for p in folder.glob("checkpoint-*") if p.suffix != ".tmp" and (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def _launched_with_deepspeed() -> bool:
    """``accelerate launch`` with a DeepSpeed config (it sets this variable for every process)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _several_processes_without_cuda() -> bool:
    """Launched as several processes (torchrun's WORLD_SIZE) on a machine without CUDA: gloo on the CPU.

    Accelerate only picks its multi-CPU mode when asked for the CPU explicitly; DeepSpeed picks gloo itself.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _launched_with_deepspeed()


def _check_one_process_per_gpu() -> None:
    """Several processes on one GPU crash in NCCL mid-start; say what to launch instead."""
    processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if gpus and processes > gpus:
        raise ValueError(
            f"{processes} processes were launched on this machine, which has {gpus} GPU(s): run one process per GPU "
            f"(accelerate launch --num_processes {gpus}), or run the processes on the CPU by hiding the GPUs "
            "(CUDA_VISIBLE_DEVICES= accelerate launch ...)")


def _compiled_reference(unet):
    """The base UNet compiled, for the sampling pass's reference forwards. A copy of the module tree taken before
    the LoRA goes in, so it never routes through adapter layers; it shares every weight with ``unet`` (no copy)."""
    shared = {id(tensor): tensor for tensor in itertools.chain(unet.parameters(), unet.buffers())}
    return torch.compile(copy.deepcopy(unet, memo=shared).eval())


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _check_lora_targets(unet, targets: list[str]) -> None:
    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        examples = sorted({n.rsplit(".", 1)[-1] for n in names if "attn" in n})[:8]
        raise ValueError(f"lora.target_modules {missing} match no module of the UNet; attention projections are "
                         f"named like {examples}")


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Trainer:
    """Builds everything from a TrainConfig, refusing bad input before any work, then ``run()``s."""

    def __init__(self, config: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
        from peft import LoraConfig

        config.validate()
        _check_one_process_per_gpu()
        if config.train.single_pass and _launched_with_deepspeed():
            raise ValueError("train.single_pass does not run under DeepSpeed, whose engine expects one backward per "
                             "micro-batch: set train.single_pass=false, or launch without DeepSpeed")
        self.config = config
        self.output_dir = Path(config.output_dir)
        self._check_output_dir()
        self.prompts = config.load_prompts()
        # DeepSpeed without CUDA runs on gloo, which Accelerate only counts processes for when named
        deepspeed_on_cpu = _launched_with_deepspeed() and not torch.cuda.is_available()
        self.accelerator = Accelerator(
            cpu=_several_processes_without_cuda(),
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if deepspeed_on_cpu else None,
            mixed_precision=config.mixed_precision,
            # single_pass takes one backward per epoch; the update pass one per (row batch, trained step)
            gradient_accumulation_steps=(1 if config.train.single_pass
                                         else config.train.gradient_accumulation_steps * config.trained_steps),
            log_with=config.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
        )
        set_seed(config.seed, device_specific=True)
        self.reward = load_reward(config.reward.name, **config.reward.kwargs).to(self.accelerator.device)
        if config.train.estimator == "pathwise" and not self.reward.differentiable:
            raise ValueError(f"train.estimator=pathwise needs a differentiable reward; {self.reward.name!r} is not "
                             "(its class does not set differentiable = True): use train.estimator=policy-gradient")
        self.deepspeed = self.accelerator.state.deepspeed_plugin is not None
        # DeepSpeed broadcasts each weight viewed as bytes, which needs the default memory layout
        self.pipeline = load_base_pipeline(config.base, config.sampling.scheduler, channels_last=not self.deepspeed)
        unet = self.pipeline.unet
        _check_lora_targets(unet, config.lora.target_modules)
        self.base_hash = weights_hash(unet)  # of the stored float32 weights, which fusion loads
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        self.pipeline.to(self.accelerator.device)
        if weight_dtype != torch.float32:
            self.pipeline.to(dtype=weight_dtype)
        self.frozen_hash = weights_hash(unet)  # as trained: must not change
        self.reference_unet = _compiled_reference(unet) if config.train.compile else None
        unet.add_adapter(LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, init_lora_weights="gaussian",
                                    target_modules=config.lora.target_modules))
        for parameter in unet.parameters():  # LoRA trains in float32 whatever the base dtype
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
        if config.train.gradient_checkpointing:  # pathwise also backpropagates through the VAE decoder
            unet.enable_gradient_checkpointing(checkpoint_keeping_adapter_routing)
            self.pipeline.vae.enable_gradient_checkpointing()
        self.lora_parameters = [p for p in unet.parameters() if p.requires_grad]
        self.sampling_unet = torch.compile(unet) if config.train.compile else unet  # shares the module, not a copy
        optimizer = torch.optim.AdamW(self.lora_parameters, lr=config.train.learning_rate,
                                      weight_decay=config.train.adam_weight_decay)
        if self.deepspeed:
            self._configure_deepspeed()
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.tracker = PerPromptStatTracker(config.train.stat_buffer, config.train.stat_min_count,
                                            config.train.advantage_normalisation)
        self.start_epoch, self.bad_epochs, self.history = 0, 0, []

    # ----------------------------------------------------------------------------------------------- set-up
    def _check_output_dir(self) -> None:
        run_config = self.output_dir / RUN_CONFIG
        if run_config.is_file() and self.config.resume is None:
            raise ValueError(f"output_dir {self.output_dir} holds another run; pass resume=latest to continue it, "
                             "or choose another output_dir")
        if self.config.resume is not None and self.config.resume != "latest" and not Path(self.config.resume).is_dir():
            raise ValueError(f"resume={self.config.resume!r}: no such checkpoint folder; use 'latest' or a path")

    def _configure_deepspeed(self) -> None:
        """The DeepSpeed engine counts micro-batches itself; ours are (row batch, denoising step) pairs, not a
        DataLoader's, so the trainer's own settings replace the launch config's."""
        train = self.config.train
        values = {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_clipping": train.max_grad_norm,
                  "gradient_accumulation_steps": self.accelerator.gradient_accumulation_steps}
        self.accelerator.state.deepspeed_plugin.deepspeed_config.update(values)
        self.accelerator.state.deepspeed_plugin.deepspeed_config.pop("train_batch_size", None)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.unet)

    # ----------------------------------------------------------------------------------------- checkpoints
    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights to save (PEFT keys, on the CPU). Under DeepSpeed they are the optimizer's float32
        master copies, partitioned over the processes, so every process must call this."""
        from peft.utils import get_peft_model_state_dict

        values = self.unwrapped.state_dict()
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            for name, parameter in self.unwrapped.named_parameters():
                master = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
                if master is not None:
                    values[name] = master
        state = get_peft_model_state_dict(self.unwrapped, state_dict=values)
        return {key: value.detach().float().cpu().contiguous() for key, value in state.items()}

    def save_checkpoint(self, epoch: int) -> None:
        """Write checkpoint-<epoch> atomically (temp folder, then rename) and keep the newest few."""
        folder = self.output_dir / "checkpoints" / f"checkpoint-{epoch + 1:05d}"
        temporary = folder.with_name(folder.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.deepspeed:  # ZeRO shards the optimizer state over processes: every process saves its own shard
            self.accelerator.save_state(str(temporary / DEEPSPEED_STATE), exclude_frozen_parameters=True)
            self.accelerator.wait_for_everyone()
        lora = self.lora_state()
        if self.accelerator.is_main_process:
            save_file(lora, temporary / "lora.safetensors")
            state = {"epoch": epoch + 1, "bad_epochs": self.bad_epochs, "history": self.history,
                     "tracker": self.tracker.state_dict()}
            if not self.deepspeed:
                tensors, state["optimizer"] = _optimizer_to_files(self.optimizer.optimizer)
                save_file(tensors, temporary / "optimizer.safetensors")
            (temporary / STATE_FILE).write_text(json.dumps(state))
            save_adapter(temporary / "adapter", self.unwrapped, self._metadata(), lora)
            os.replace(temporary, folder)
            kept = sorted(p for p in folder.parent.glob("checkpoint-*") if p.suffix != ".tmp")
            for old in kept[: -self.config.checkpoint.keep]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, folder: Path) -> None:
        from peft.utils import set_peft_model_state_dict

        state = json.loads((folder / STATE_FILE).read_text())
        set_peft_model_state_dict(self.unwrapped, load_file(folder / "lora.safetensors"))
        if self.deepspeed:  # the engine restores its own parameter copies and optimizer shards
            if not (folder / DEEPSPEED_STATE).is_dir():
                raise ValueError(f"{folder} was written without DeepSpeed; resume it with the launch config it "
                                 "was trained with")
            self.accelerator.load_state(str(folder / DEEPSPEED_STATE), load_module_strict=False)
        elif "optimizer" not in state:
            raise ValueError(f"{folder} was written under DeepSpeed (its optimizer state is sharded); resume it with "
                             "a DeepSpeed launch config")
        else:
            for parameter in self.lora_parameters:
                parameter.data = parameter.data.float()
            _optimizer_from_files(self.optimizer.optimizer, load_file(folder / "optimizer.safetensors"),
                                  state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.start_epoch, self.bad_epochs, self.history = state["epoch"], state["bad_epochs"], state["history"]

    # -------------------------------------------------------------------------------------------- metadata
    def _metadata(self) -> AdapterMetadata:
        config, scheduler = self.config, self.pipeline.scheduler
        last = self.history[-1] if self.history else {}
        return AdapterMetadata(
            reward_name=self.reward.name, reward_version=self.reward.version, beta=config.beta,
            step_reward=config.reward.step_reward, base_model=config.base, base_model_hash=self.base_hash,
            scheduler_class=type(scheduler).__name__, scheduler_config=dict(scheduler.config),
            num_inference_steps=config.sampling.num_inference_steps, eta=config.sampling.eta,
            guidance_scale=config.sampling.guidance_scale, lora_rank=config.lora.rank, lora_alpha=config.lora.alpha,
            lora_target_modules=list(config.lora.target_modules),
            training={"epochs": len(self.history), "seed": config.seed, "processes": self.accelerator.num_processes,
                      "trajectories_per_epoch": config.sampling.batch_size * config.sampling.batches_per_epoch
                      * self.accelerator.num_processes,
                      "first_reward_mean": self.history[0]["reward_mean"] if self.history else None,
                      "last_reward_mean": last.get("reward_mean"), "last_kl": last.get("kl")},
        )

    # ---------------------------------------------------------------------------------------------- phases
    def _sample(self, epoch: int) -> tuple[Trajectories, torch.Tensor]:
        """This process's trajectories and their advantages (pathwise: zeros, kept only to mark dropped rows)."""
        config, device = self.config, self.accelerator.device
        pathwise = config.train.estimator == "pathwise"
        process = self.accelerator.process_index
        batches = []
        self.unwrapped.eval()
        for batch_index in range(config.sampling.batches_per_epoch):
            rng = np.random.default_rng(_seed(config.seed, epoch, process, batch_index, 1))
            prompts = [self.prompts[i] for i in rng.integers(0, len(self.prompts), config.sampling.batch_size)]
            positive, negative = encode_prompts(self.pipeline, prompts, device)
            generator = torch.Generator().manual_seed(_seed(config.seed, epoch, process, batch_index, 2))
            batches.append(sample_trajectories(
                self.pipeline, self.sampling_unet, self.reward, prompts, positive, negative,
                config.sampling.num_inference_steps, config.sampling.eta, config.sampling.guidance_scale,
                "terminal" if pathwise else config.reward.step_reward, need_reference=config.beta > 0,
                generator=generator, keep_noises=pathwise,
                graph_steps=self._graph_steps(epoch, batch_index) if config.train.single_pass else None,
                reference_unet=self.reference_unet))
        merged = _concatenate(batches)
        if pathwise:  # the step rewards are recomputed with grad in the update
            finite = torch.isfinite(merged.final_rewards).cpu()  # advantages live on the CPU, as _advantages' do
            return merged, torch.where(finite, 0.0, torch.nan)[:, None].expand(-1, len(merged.timesteps))
        return merged, self._advantages(merged)

    def _graph_steps(self, epoch: int, batch_index: int) -> torch.Tensor:
        """The steps of one sampling batch that train (``train.single_pass``): timestep_fraction of them, at random."""
        config, steps = self.config, self.config.sampling.num_inference_steps
        generator = torch.Generator().manual_seed(
            _seed(config.seed, epoch, self.accelerator.process_index, batch_index, 4))
        chosen = torch.zeros(steps, dtype=torch.bool)
        chosen[torch.randperm(steps, generator=generator)[:config.trained_steps]] = True
        return chosen

    def _advantages(self, trajectories: Trajectories) -> torch.Tensor:
        """Per-prompt (and per-step for dense step rewards) advantages over all processes' samples."""
        from accelerate.utils import gather_object

        rewards = trajectories.step_rewards.cpu().double()
        if trajectories.state_values is not None and self.config.train.state_baseline:
            rewards = rewards - trajectories.state_values.cpu().double()
        all_rewards = self.accelerator.gather(rewards.to(self.accelerator.device)).cpu().numpy()
        all_prompts = gather_object(trajectories.prompts)
        finite = np.isfinite(all_rewards).all(axis=1)
        advantages = np.zeros_like(all_rewards)
        if finite.any():
            steps = all_rewards.shape[1]
            if self.config.reward.step_reward == "terminal":
                keys = [p for p, ok in zip(all_prompts, finite) if ok]
                per_prompt = self.tracker.update(keys, all_rewards[finite, -1])
                advantages[finite] = per_prompt[:, None]
            else:
                rows = np.flatnonzero(finite)
                keys = [(all_prompts[r], s) for r in rows for s in range(steps)]
                advantages[finite] = self.tracker.update(keys, all_rewards[finite].reshape(-1)).reshape(-1, steps)
        advantages[~finite] = np.nan  # marks dropped samples
        start = self.accelerator.process_index * len(trajectories.prompts)
        return torch.as_tensor(advantages[start:start + len(trajectories.prompts)], dtype=torch.float32)

    def _train_epoch(self, epoch: int, trajectories: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        config = self.config
        if config.train.single_pass:
            return self._check_loss(epoch, self._train_on_sampling_graph(trajectories, advantages))
        keep = torch.isfinite(advantages).all(dim=1)
        count, steps = len(trajectories.prompts), len(trajectories.timesteps)
        scheduler = self.pipeline.scheduler
        # summed on the device and read once per epoch: reading a value every step would make the CPU wait for the GPU
        sums = dict.fromkeys(LOGGED_TERMS, 0.0)
        updates = 0
        advantages = advantages.to(self.accelerator.device)
        self.unet.train()
        for inner in range(config.train.inner_epochs):
            generator = torch.Generator().manual_seed(_seed(config.seed, epoch, self.accelerator.process_index, inner, 3))
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, config.train.batch_size):
                rows = order[start:start + config.train.batch_size]
                rows = rows[keep[rows]]
                step_order = torch.randperm(steps, generator=generator)[:config.trained_steps]
                for step in step_order.tolist():
                    with self.accelerator.accumulate(self.unet):
                        terms = self._step_terms(trajectories, advantages, rows, step, scheduler)
                        self.accelerator.backward(terms.loss)
                        if self.accelerator.sync_gradients:
                            self.accelerator.clip_grad_norm_(self.lora_parameters, config.train.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    for key in sums:
                        sums[key] = sums[key] + getattr(terms, key).detach().float()
                    updates += 1
        return self._check_loss(epoch, {key: float(value) / max(updates, 1) for key, value in sums.items()})

    def _check_loss(self, epoch: int, means: dict[str, float]) -> dict[str, float]:
        if not math.isfinite(means["loss"]):  # before this epoch's checkpoint: the last one written stays the last good
            raise RuntimeError(f"the loss became {means['loss']} at epoch {epoch + 1}; stopping. The last good "
                               f"checkpoint is {latest_checkpoint(self.output_dir)}. Lower train.learning_rate or "
                               "raise beta")
        return means

    def _train_on_sampling_graph(self, trajectories: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        """One gradient step through the sampling pass's graph (``train.single_pass``). The policy is still the
        sampling one, so each transition's loss and gradient are the update pass's at its first step (ratio 1)."""
        config = self.config
        keep = torch.isfinite(advantages).all(dim=1).to(trajectories.graph_log_probs.device)
        log_prob = trajectories.graph_log_probs[keep].reshape(-1)
        advantages = advantages.to(keep.device).gather(1, trajectories.graph_step_indices.to(keep.device))
        kl = trajectories.graph_kls[keep].reshape(-1) if trajectories.graph_kls is not None else None
        terms = step_loss(log_prob, log_prob.detach(), advantages[keep].reshape(-1), kl, config.beta,
                          config.train.clip_range, config.train.advantage_clip)
        if len(log_prob):
            self.accelerator.backward(terms.loss)
        if self.accelerator.num_processes > 1:  # the forward ran outside DDP's wrapper, which would all-reduce
            self._average_gradients()
        self.accelerator.clip_grad_norm_(self.lora_parameters, config.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {key: float(getattr(terms, key).detach()) for key in LOGGED_TERMS}

    def _average_gradients(self) -> None:
        """Average the LoRA gradients over processes in one all-reduce, as DDP would."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.lora_parameters]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        for parameter, piece in zip(self.lora_parameters, flat.split([g.numel() for g in grads])):
            parameter.grad = piece.view_as(parameter)

    def _step_terms(self, trajectories: Trajectories, advantages: torch.Tensor, rows: torch.Tensor, step: int,
                    scheduler):
        config = self.config
        prompt_rows, rows = rows, rows.to(trajectories.latents.device, non_blocking=True)
        latents = trajectories.latents[rows, step]
        timestep = trajectories.timesteps[step]
        output = guided_output(self.unet, latents, timestep, trajectories.prompt_embeds[rows],
                               trajectories.negative_embeds[rows], config.sampling.guidance_scale)
        kernel = step_kernel(scheduler, output.float(), timestep, latents.float(), eta=config.sampling.eta)
        kl = None
        if config.beta > 0:
            reference = StepKernel(mean=trajectories.reference_means[rows, step].float(),
                                   variance=trajectories.reference_variances[rows, step].float())
            kl = kernel_kl(kernel, reference)
        if config.train.estimator == "pathwise":
            action = kernel.mean + kernel.std * trajectories.noises[rows, step].float()
            return pathwise_step_loss(self._pathwise_reward(trajectories, rows, prompt_rows, step, action), kl,
                                      config.beta)
        log_prob = kernel.log_prob(trajectories.latents[rows, step + 1].float())
        return step_loss(log_prob, trajectories.log_probs[rows, step].float(),
                         advantages.to(log_prob.device)[rows, step], kl, config.beta, config.train.clip_range,
                         config.train.advantage_clip)

    def _pathwise_reward(self, trajectories: Trajectories, rows: torch.Tensor, prompt_rows: torch.Tensor, step: int,
                         action: torch.Tensor) -> torch.Tensor:
        """The step reward of ``action`` = x_{t-1}, with grad flowing back to it through the reference (whose
        weights stay frozen: the adapter is routed off): r(x0_hat_ref(x_{t-1})) for ``tweedie``, r of the
        deterministic reference continuation from x_{t-1} for ``rollout``."""
        config, timesteps = self.config, trajectories.timesteps
        embeds, negative = trajectories.prompt_embeds[rows], trajectories.negative_embeds[rows]
        clean = action
        if step + 1 < len(timesteps) and config.reward.step_reward == "rollout":
            clean = reference_continuation(self.pipeline, self.unwrapped, None, action, timesteps[step + 1:], embeds,
                                           negative, config.sampling.guidance_scale)
        elif step + 1 < len(timesteps):
            clean = adapter_kernels(self.unwrapped, self.pipeline.scheduler, action, timesteps[step + 1], embeds,
                                    negative, [BASE], config.sampling.guidance_scale,
                                    config.sampling.eta)[0].pred_original_sample
        images = decode_latents(self.pipeline, clean, grad=True)
        return self.reward(images, [trajectories.prompts[i] for i in prompt_rows.tolist()], grad=True)

    def _sample_grid(self, epoch: int) -> None:
        from msdda.world.sampling import image_grid

        prompts = self.prompts[:: max(1, len(self.prompts) // 8)][:8]
        positive, negative = encode_prompts(self.pipeline, prompts, self.accelerator.device)
        self.unwrapped.eval()
        images = sample_trajectories(
            self.pipeline, self.unwrapped, self.reward, prompts, positive, negative,
            self.config.sampling.num_inference_steps, self.config.sampling.eta, self.config.sampling.guidance_scale,
            "terminal", need_reference=False, generator=torch.Generator().manual_seed(self.config.seed)).images
        pil = images_to_pil(self.pipeline, images)
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        image_grid(pil, columns=len(pil)).save(folder / f"epoch-{epoch + 1:05d}.png")

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> Path:
        """Train (resuming if asked), checkpoint, and export the final adapter; returns its folder."""
        config, accelerator = self.config, self.accelerator
        if config.resume is not None:
            checkpoint = latest_checkpoint(self.output_dir) if config.resume == "latest" else Path(config.resume)
            if checkpoint is None:
                raise ValueError(f"resume=latest but {self.output_dir}/checkpoints holds no complete checkpoint")
            self.load_checkpoint(checkpoint)
            logger.info("resumed from %s at epoch %d", checkpoint, self.start_epoch)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / RUN_CONFIG).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        if config.log_with:
            flat = {k: str(v) if isinstance(v, (list, dict)) or v is None else v
                    for k, v in _flatten(config_to_dict(config)).items()}
            accelerator.init_trackers("msdda-train", config=flat)
        progress = tqdm(range(self.start_epoch, config.epochs), desc="epochs", initial=self.start_epoch,
                        total=config.epochs, disable=not accelerator.is_local_main_process)
        on_cuda = accelerator.device.type == "cuda"
        for epoch in progress:
            started = time.time()
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(accelerator.device)
            trajectories, advantages = self._sample(epoch)
            dropped = int((~torch.isfinite(advantages).all(dim=1)).sum())
            rewards = trajectories.final_rewards
            finite_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()
            finite_rewards = finite_rewards[torch.isfinite(finite_rewards)]
            if dropped == len(trajectories.prompts):
                self.bad_epochs += 1
                if self.bad_epochs >= config.max_bad_epochs:
                    raise RuntimeError(f"the reward {self.reward.name!r} returned NaN/inf for every sample of "
                                       f"{self.bad_epochs} epochs in a row; check the reward on these prompts")
                continue
            self.bad_epochs = 0
            metrics = self._train_epoch(epoch, trajectories, advantages)
            metrics.update(reward_mean=float(finite_rewards.mean()), reward_std=float(finite_rewards.std()),
                           dropped_samples=dropped, epoch_seconds=time.time() - started)
            if on_cuda:  # what this process's GPU needed at most, to size train.batch_size (docs/training.md)
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            self.history.append({"epoch": epoch + 1, **metrics})
            if config.log_with:
                accelerator.log(metrics, step=epoch + 1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
            if (epoch + 1) % config.checkpoint.every == 0 or epoch + 1 == config.epochs:
                self.save_checkpoint(epoch)
            if config.sample_every and (epoch + 1) % config.sample_every == 0 and accelerator.is_main_process:
                self._sample_grid(epoch)
        if weights_hash(self.unwrapped) != self.frozen_hash:
            raise RuntimeError("the base UNet weights changed during training; only the LoRA may train")
        final = self.output_dir / "final"
        lora = self.lora_state()
        if accelerator.is_main_process:
            save_adapter(final, self.unwrapped, self._metadata(), lora)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return final


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _concatenate(batches: list[Trajectories]) -> Trajectories:
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    return Trajectories(
        prompts=[p for b in batches for p in b.prompts],
        prompt_embeds=torch.cat([b.prompt_embeds for b in batches]),
        negative_embeds=torch.cat([b.negative_embeds for b in batches]),
        timesteps=first.timesteps,
        latents=torch.cat([b.latents for b in batches]),
        noises=_cat_optional([b.noises for b in batches]),
        log_probs=torch.cat([b.log_probs for b in batches]),
        reference_means=_cat_optional([b.reference_means for b in batches]),
        reference_variances=_cat_optional([b.reference_variances for b in batches]),
        step_rewards=torch.cat([b.step_rewards for b in batches]),
        images=torch.cat([b.images for b in batches]),
        state_values=_cat_optional([b.state_values for b in batches]),
        graph_step_indices=_cat_optional([b.graph_step_indices for b in batches]),
        graph_log_probs=_cat_optional([b.graph_log_probs for b in batches]),
        graph_kls=_cat_optional([b.graph_kls for b in batches]),
    )


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors)


def train(config: TrainConfig) -> Path:
    """Train one adapter as ``config`` says; returns the final adapter folder."""
    return Trainer(config).run()
