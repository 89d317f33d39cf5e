"""Processes and devices: launch checks, the Accelerator, DeepSpeed's settings, FSDP2's sharded tensors, gathers and
gradient averages.

Everything here is about how many processes run and where; the algorithm in msdda.train.trainer reads the
same on one CPU process as on several GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from msdda.errors import UserError
from msdda.train.config import TrainConfig

__all__ = ["check_launch", "build_accelerator", "configure_deepspeed", "launched_with_deepspeed", "launched_with_fsdp",
           "uses_deepspeed", "master_weights", "uses_fsdp", "full_tensor", "shard_like", "gather_rows", "own_rows",
           "average_gradients"]


def launched_with_deepspeed() -> bool:
    """``accelerate launch`` with a DeepSpeed config (it sets this variable for every process)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_with_fsdp() -> bool:
    """``accelerate launch`` with an FSDP config (it sets this variable for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _several_processes_without_cuda() -> bool:
    """Launched as several processes (torchrun's WORLD_SIZE) on a machine without CUDA: gloo on the CPU.

    Accelerate only picks its multi-CPU mode when asked for the CPU explicitly; DeepSpeed picks gloo itself.
    """
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return not torch.cuda.is_available() and several and not launched_with_deepspeed()


def check_launch(config: TrainConfig) -> None:
    """Refuse launches that would crash later: several processes on one GPU (NCCL fails mid-start), FSDP version 1,
    and ``train.single_pass`` under DeepSpeed (whose engine expects one backward per micro-batch) or FSDP."""
    processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if gpus and processes > gpus:
        raise UserError(
            f"{processes} processes were launched on this machine, which has {gpus} GPU(s): run one process per GPU "
            f"(accelerate launch --num_processes {gpus}), or run the processes on the CPU by hiding the GPUs "
            "(CUDA_VISIBLE_DEVICES= accelerate launch ...)")
    if launched_with_fsdp() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("the launch config asks for FSDP version 1; msdda trains under FSDP2 (torch's fully_shard): "
                        "set fsdp_config.fsdp_version: 2, as launch/accelerate/fsdp2.yaml does")
    if config.train.single_pass and launched_with_fsdp():
        raise UserError("train.single_pass does not run under FSDP (its gradient average reads whole gradients, which "
                        "FSDP shards): set train.single_pass=false, or launch without FSDP")
    if config.train.single_pass and launched_with_deepspeed():
        raise UserError("train.single_pass does not run under DeepSpeed, whose engine expects one backward per "
                         "micro-batch: set train.single_pass=false, or launch without DeepSpeed")


def build_accelerator(config: TrainConfig):
    """The Accelerator for this launch: multi-CPU or gloo where there is no CUDA, and one optimizer step per
    ``gradient_accumulation_steps`` backwards (the update pass takes one backward per row batch and trained
    step; ``single_pass`` one per epoch)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    output_dir = Path(config.output_dir)
    process_group = {}
    if launched_with_deepspeed() and not torch.cuda.is_available():
        process_group["backend"] = "gloo"  # DeepSpeed without CUDA: gloo, which Accelerate only counts when named
    if config.process_group_timeout is not None:
        process_group["timeout"] = timedelta(seconds=config.process_group_timeout)
    accelerator = Accelerator(
        cpu=_several_processes_without_cuda(),
        kwargs_handlers=[InitProcessGroupKwargs(**process_group)] if process_group else None,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=(1 if config.train.single_pass
                                     else config.train.gradient_accumulation_steps * config.trained_steps),
        log_with=config.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if launched_with_fsdp() and not torch.cuda.is_available():
        _fsdp_on_cpu(accelerator, config.mixed_precision)
    return accelerator


def _fsdp_on_cpu(accelerator, mixed_precision: str) -> None:
    """Put an Accelerator of CPU processes (gloo) under the launch's FSDP2 plugin.

    Accelerate (1.15) turns an FSDP launch config into DistributedType.FSDP only for GPU-like devices: on the CPU its
    state stays MULTI_CPU and the config is dropped without a word, so each process would train unsharded. torch's
    ``fully_shard`` runs on gloo, and so does Accelerate's own FSDP2 path (``prepare``, gradient clipping, no-sync
    accumulation) once the state names it; this sets the fields Accelerate's FSDP branch would have set, so that
    FSDP2 trains, checkpoints and resumes on CPU processes as on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    # every later AcceleratorState() copies PartialState's fields over its own, as Accelerate's FSDP branch knows
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def uses_deepspeed(accelerator) -> bool:
    """Whether ``accelerator`` drives a DeepSpeed engine (which owns the optimizer state and master weights)."""
    return accelerator.state.deepspeed_plugin is not None


def master_weights(accelerator, parameters) -> list[torch.Tensor | None]:
    """The float32 values the optimizer steps for each of ``parameters``: under DeepSpeed its master copies (None for
    a parameter it does not train; partitioned over the processes, so every process must call this), else None for
    every parameter (the parameters are their own masters)."""
    parameters = list(parameters)
    if not uses_deepspeed(accelerator):
        return [None] * len(parameters)
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(parameter) if parameter.requires_grad else None for parameter in parameters]


def uses_fsdp(accelerator) -> bool:
    """Whether ``accelerator`` shards the model with FSDP2 (its parameters are DTensors, each process holds a part)."""
    return accelerator.is_fsdp2


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of an FSDP2-sharded tensor (a DTensor: a collective, so every process must call this), or ``tensor``
    itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole ``tensor`` (the same on every process) sharded as ``reference`` is, where that is a DTensor (FSDP2), to
    load it into that parameter or state; else ``tensor`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return tensor
    return distribute_tensor(tensor.to(reference.device), reference.device_mesh, reference.placements)


def configure_deepspeed(accelerator, config: TrainConfig) -> None:
    """The DeepSpeed engine counts micro-batches itself; ours are (row batch, denoising step) pairs, not a
    DataLoader's, so the trainer's own settings replace the launch config's."""
    values = {"train_micro_batch_size_per_gpu": config.train.batch_size,
              "gradient_clipping": config.train.max_grad_norm,
              "gradient_accumulation_steps": accelerator.gradient_accumulation_steps}
    deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
    deepspeed_config.update(values)
    deepspeed_config.pop("train_batch_size", None)


def gather_rows(accelerator, values: torch.Tensor, prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Every process's rows of ``values`` and their prompts, in process order (the same on every process)."""
    from accelerate.utils import gather_object

    return accelerator.gather(values.to(accelerator.device)).cpu().numpy(), gather_object(list(prompts))


def own_rows(accelerator, gathered: np.ndarray, count: int) -> np.ndarray:
    """This process's ``count`` rows of an array laid out as ``gather_rows`` returns it."""
    start = accelerator.process_index * count
    return gathered[start:start + count]


def average_gradients(accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """Average the gradients over processes in one all-reduce, as DDP would (for forwards run outside its
    wrapper, such as the sampling pass's)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for parameter, piece in zip(parameters, flat.split([g.numel() for g in grads])):
        parameter.grad = piece.view_as(parameter)
