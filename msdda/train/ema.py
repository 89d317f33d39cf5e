"""An exponential moving average (EMA) of the adapter's weights (``ema.*``): built, checkpointed, and read out.

diffusers' ``EMAModel`` does the averaging. It takes the LoRA's parameters as a list, copies the raw weights for
its first ``update_after_step`` steps, then ramps its decay in as min(decay, (1 + n) / (10 + n)), the schedule of
Flow-GRPO's ema. What it lacks for us is a checkpoint without pickles (its ``state_dict`` is a list of tensors
beside scalars, which Accelerate would ``torch.save``): here its tensors go to a safetensors file keyed by the
parameters' names and its scalars to the trainer's JSON state, so a resumed run continues the same average bit for
bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from msdda.errors import UserError
from msdda.train.config import EmaSettings
from msdda.train.distributed import full_tensor, master_weights, shard_like

__all__ = ["EMA_FILE", "build_ema", "averaged_values", "ema_to_files", "ema_from_files", "ema_weights", "ema_weights_in"]

EMA_FILE = "ema.safetensors"
"""The EMA's weights in a checkpoint folder, keyed by the trained parameters' names."""


def build_ema(parameters: Sequence[torch.nn.Parameter], settings: EmaSettings):
    """diffusers' EMAModel over ``parameters`` (starting at their current values, kept in float32 whatever their
    dtype: a bf16 working copy under DeepSpeed would round the average away), or None where ``settings.decay`` is
    unset."""
    if settings.decay is None:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(parameters, decay=settings.decay, update_after_step=settings.start_step)
    ema.to(dtype=torch.float32)
    return ema


def averaged_values(accelerator, parameters: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """What the EMA averages after an optimizer step: the trained parameters, or under DeepSpeed the optimizer's
    float32 master copies (every process must call this: the masters are partitioned). Averaging the engine's bf16
    working copies would average weights rounded to bf16, where the raw export is the float32 masters. EMAModel
    averages only values that require grad, so the masters are handed over as such."""
    return [parameter if master is None else torch.nn.Parameter(master, requires_grad=True)
            for parameter, master in zip(parameters, master_weights(accelerator, parameters), strict=True)]


def ema_to_files(ema, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA's weights as safetensors tensors keyed by ``names`` (the parameters', in order), and its step count
    (JSON). Under FSDP2 they are sharded like the parameters: every process must call this."""
    tensors = {name: full_tensor(shadow).detach().cpu().contiguous()
               for name, shadow in zip(names, ema.shadow_params, strict=True)}
    return tensors, {"optimization_step": ema.optimization_step}


def ema_from_files(ema, names: Sequence[str], folder: Path, scalars: dict | None) -> None:
    """Restore what ``ema_to_files`` wrote into ``folder`` (a checkpoint) and its JSON ``scalars``; refused where the
    checkpoint was written without an EMA."""
    path = folder / EMA_FILE
    if scalars is None or not path.is_file():
        raise UserError(f"{folder} was written without an EMA, and this run sets ema.decay: resume it without "
                        "ema.decay, or start a new run (another output_dir) with the EMA")
    tensors = load_file(path)
    if sorted(tensors) != sorted(names):
        raise UserError(f"{path} holds the EMA of other parameters than this run trains (different lora.* settings "
                        "from the run that wrote it): resume with the settings it was trained with")
    ema.shadow_params = [shard_like(tensors[name], shadow).to(shadow.device)
                         for name, shadow in zip(names, ema.shadow_params)]
    ema.optimization_step = int(scalars["optimization_step"])


def ema_weights(ema, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The EMA's weights by parameter name (what ``checkpoint.lora_state`` takes in place of the raw ones)."""
    return dict(zip(names, ema.shadow_params, strict=True))


@contextmanager
def ema_weights_in(ema, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """The model's trained ``parameters`` hold the EMA's weights inside the block (to gauge the averaged adapter),
    and their raw values again after it. (EMAModel's own store() moves a copy to the CPU, which an FSDP2 shard on a
    GPU does not survive; this keeps it where it is.)"""
    raw = [parameter.detach().clone() for parameter in parameters]
    ema.copy_to(parameters)
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, value in zip(parameters, raw):
                parameter.copy_(value)
