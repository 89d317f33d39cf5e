"""Checkpoints: everything that changes during a run, written atomically so that a resume is bit-exact.

A checkpoint-<epoch> folder holds the LoRA weights (lora.safetensors), the optimizer state (optimizer.safetensors,
or DeepSpeed's own shards under deepspeed/), the trainer's state (trainer_state.json: epochs done, reward
statistics, history) and a loadable adapter. It is written to a .tmp folder and renamed when complete, so a
run killed mid-write leaves the previous checkpoint as the newest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from msdda.adapters import AdapterMetadata, save_adapter
from msdda.errors import UserError
from msdda.train.distributed import full_tensor, master_weights, shard_like, uses_deepspeed

__all__ = ["latest_checkpoint", "check_output_dir", "resume_folder", "finished_run", "lora_state", "save_checkpoint",
           "load_checkpoint", "optimizer_to_files", "optimizer_from_files", "RUN_CONFIG", "STATE_FILE"]

RUN_CONFIG = "run_config.yaml"
STATE_FILE = "trainer_state.json"
DEEPSPEED_STATE = "deepspeed"
"""Accelerate's save_state folder: DeepSpeed's own (torch.save) format, written by this run."""


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (half-written ones end in .tmp and are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    complete = sorted(p for p in folder.glob("checkpoint-*") if p.suffix != ".tmp" and (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def check_output_dir(output_dir: Path, resume: str | None) -> None:
    """Refuse to overwrite another run, and a ``resume`` that names no folder, before any work."""
    if (output_dir / RUN_CONFIG).is_file() and resume is None:
        raise UserError(f"output_dir {output_dir} holds another run; pass resume=latest to continue it, "
                         "or choose another output_dir")
    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        raise UserError(f"resume={resume!r}: no such checkpoint folder; use 'latest' or a path")
    if resume == "latest" and latest_checkpoint(output_dir) is None and not (output_dir / RUN_CONFIG).is_file():
        raise UserError(f"resume=latest (--resume) but {output_dir} holds no run to continue (no {RUN_CONFIG}, no "
                        "complete checkpoint); check output_dir, or start without --resume")


def resume_folder(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``resume`` ('latest' or a folder) names; None for 'latest' where the run stopped before its
    first complete checkpoint (it saved nothing, so it starts again from the beginning)."""
    return latest_checkpoint(output_dir) if resume == "latest" else Path(resume)


def finished_run(output_dir: Path, resume: str | None, epochs: int) -> tuple[Path, int] | None:
    """For a resume with nothing left to train, the final adapter and the epochs its checkpoint trained; else None.

    That is a checkpoint that trained ``epochs`` or more and a ``final/`` folder beside it: resuming it would train
    no epoch and write ``final`` again from the checkpoint's LoRA. Without ``final/`` (a run stopped before its
    export) the resume still exports it."""
    final = output_dir / "final"
    if resume is None or not final.is_dir():
        return None
    checkpoint = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if checkpoint is None or not (checkpoint / STATE_FILE).is_file():
        return None
    trained = json.loads((checkpoint / STATE_FILE).read_text())["epoch"]
    return (final, trained) if trained >= epochs else None


def lora_state(accelerator, model, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights to save (PEFT keys, float32, on the CPU). Under DeepSpeed they are the optimizer's float32
    master copies, and under FSDP2 they are sharded: both partitioned over the processes, so every process must call
    this. ``weights`` (parameter name -> value, such as the EMA's) replace the trained values."""
    from peft.utils import get_peft_model_state_dict

    unwrapped = accelerator.unwrap_model(model)
    values = unwrapped.state_dict()
    if weights is None:
        names, parameters = zip(*unwrapped.named_parameters())
        values.update({name: master for name, master in zip(names, master_weights(accelerator, parameters))
                       if master is not None})
    values.update(weights or {})
    state = get_peft_model_state_dict(unwrapped, state_dict=values)
    return {key: full_tensor(value).detach().float().cpu().contiguous() for key, value in state.items()}


def save_checkpoint(output_dir: Path, epoch: int, accelerator, model, optimizer, state: dict,
                    metadata: AdapterMetadata, keep: int,
                    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write checkpoint-<epoch + 1> atomically and keep the newest ``keep``; every process must call this.

    ``state`` is the trainer's JSON-able state (epoch, bad_epochs, history, tracker); ``optimizer`` is the one
    ``accelerator.prepare`` returned; ``tensor_files`` are further safetensors files to write, by file name (the
    EMA's weights).
    """
    folder = output_dir / "checkpoints" / f"checkpoint-{epoch + 1:05d}"
    temporary = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if uses_deepspeed(accelerator):  # ZeRO shards the optimizer state over processes: every process saves its own shard
        accelerator.save_state(str(temporary / DEEPSPEED_STATE), exclude_frozen_parameters=True)
        accelerator.wait_for_everyone()
    lora = lora_state(accelerator, model)
    state = dict(state)
    if not uses_deepspeed(accelerator):  # on every process: FSDP2 gathers its shards
        optimizer_tensors, state["optimizer"] = optimizer_to_files(optimizer.optimizer)
    if accelerator.is_main_process:
        save_file(lora, temporary / "lora.safetensors")
        for name, tensors in (tensor_files or {}).items():
            save_file(tensors, temporary / name)
        if not uses_deepspeed(accelerator):
            save_file(optimizer_tensors, temporary / "optimizer.safetensors")
        (temporary / STATE_FILE).write_text(json.dumps(state))
        save_adapter(temporary / "adapter", accelerator.unwrap_model(model), metadata, lora)
        os.replace(temporary, folder)
        kept = sorted(p for p in folder.parent.glob("checkpoint-*") if p.suffix != ".tmp")
        for old in kept[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, accelerator, model, optimizer, parameters: list[torch.nn.Parameter]) -> dict:
    """Restore the LoRA weights and optimizer state of ``folder``; returns the trainer's state saved beside them.

    A checkpoint's optimizer state is in the format its run wrote (our safetensors, or DeepSpeed's shards), and
    only a run launched the same way reads it back.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state = json.loads((folder / STATE_FILE).read_text())
    unwrapped = accelerator.unwrap_model(model)
    current = get_peft_model_state_dict(unwrapped)  # FSDP2's DTensors, which the saved weights are sharded like
    lora = {key: shard_like(value, current[key]) if key in current else value
            for key, value in load_file(folder / "lora.safetensors").items()}
    set_peft_model_state_dict(unwrapped, lora)
    if uses_deepspeed(accelerator):  # the engine restores its own parameter copies and optimizer shards
        if not (folder / DEEPSPEED_STATE).is_dir():
            raise UserError(f"{folder} was written without DeepSpeed; resume it with the launch config it "
                             "was trained with")
        accelerator.load_state(str(folder / DEEPSPEED_STATE), load_module_strict=False)
    elif "optimizer" not in state:
        raise UserError(f"{folder} was written under DeepSpeed (its optimizer state is sharded); resume it with "
                         "a DeepSpeed launch config")
    else:
        for parameter in parameters:
            parameter.data = parameter.data.float()
        optimizer_from_files(optimizer.optimizer, load_file(folder / "optimizer.safetensors"), state["optimizer"])
    return state


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors tensors (keyed '<parameter index>.<name>') and JSON-able rest, so
    that checkpoints hold no pickles. Under FSDP2 its state is sharded: every process must call this."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = full_tensor(value).detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what ``optimizer_to_files`` wrote back into ``optimizer`` (sharded as its parameters are, under FSDP2)."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        parameter = parameters[int(index)]
        sharded = shard_like(tensor, parameter) if tensor.shape == parameter.shape else tensor  # not Adam's step
        state.setdefault(int(index), {})[key] = sharded
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
