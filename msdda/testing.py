"""Helpers for tests and benchmarks: reward adapters with random weights on the embedded world."""

from __future__ import annotations

from pathlib import Path

import torch

from msdda.adapters import AdapterMetadata, save_adapter, weights_hash

__all__ = ["random_world_adapter"]

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_world_adapter(folder: str | Path, seed: int, beta: float = 0.01, num_inference_steps: int = 4,
                         scale: float = 0.3, rank: int = 2, base: str | Path | None = None) -> Path:
    """A LoRA with random non-zero weights and true metadata, as the trainer writes it.

    ``base`` is a local pipeline folder (default: the shipped world); its scheduler class is kept.
    """
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from msdda.world import world_path

    pipeline = StableDiffusionPipeline.from_pretrained(base or world_path(), local_files_only=True)
    unet = pipeline.unet
    base_hash = weights_hash(unet)
    generator = torch.Generator().manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    scheduler = pipeline.scheduler
    if type(scheduler).__name__ not in ("DDIMScheduler", "DDPMScheduler"):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler.config)
    metadata = AdapterMetadata(
        reward_name=f"random-{seed}", reward_version="1", beta=beta, step_reward="tweedie",
        base_model=str(base or "world"), base_model_hash=base_hash, scheduler_class=type(scheduler).__name__,
        scheduler_config=dict(scheduler.config),
        num_inference_steps=num_inference_steps, eta=1.0, guidance_scale=3.0, lora_rank=rank,
        lora_alpha=float(rank), lora_target_modules=list(TARGETS), training={"note": "random weights"})
    return save_adapter(folder, unet, metadata)
