"""The policy being trained: the base pipeline with a fresh LoRA adapter on its denoiser (the UNet, or SD3's
transformer), and the frozen reference.

The reference p_ref is the same denoiser with the adapter routed off (or, with ``train.compile``, a compiled copy
of the module tree taken before the adapter went in, sharing every weight). Only the LoRA trains, in float32
whatever the base's dtype; the hashes let the trainer prove the base stayed frozen and let fusion check that
an adapter was trained on the weights it loads.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch

from msdda.adapters import weights_hash
from msdda.diffusion import checkpoint_keeping_adapter_routing, denoiser_of, load_base_pipeline
from msdda.errors import UserError
from msdda.models import family_of
from msdda.train.config import TrainConfig

__all__ = ["Policy", "load_policy"]

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Policy:
    """What ``load_policy`` builds (``denoiser_of(pipeline)``, the UNet or the transformer, carries the adapter)."""

    pipeline: object
    lora_parameters: list[torch.nn.Parameter]
    sampling_unet: torch.nn.Module
    """The denoiser the sampling pass runs: ``denoiser_of(pipeline)`` itself, or compiled (sharing the module)."""
    reference_unet: torch.nn.Module | None
    """The compiled base denoiser without the adapter (``train.compile``), or None: the reference is then
    ``denoiser_of(pipeline)`` with its adapter routed off."""
    base_hash: str
    """Of the stored float32 base weights, which fusion loads."""
    frozen_hash: str
    """Of the base weights as trained (maybe cast to the mixed-precision dtype): must not change."""


def _check_lora_targets(unet, targets: list[str]) -> None:
    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        examples = sorted({n.rsplit(".", 1)[-1] for n in names if "attn" in n})[:8]
        raise UserError(f"lora.target_modules {missing} match no module of the {type(unet).__name__}; attention "
                         f"projections are named like {examples}")


def _compiled_reference(unet):
    """The base UNet compiled, for the sampling pass's reference forwards. A copy of the module tree taken before
    the LoRA goes in, so it never routes through adapter layers; it shares every weight with ``unet`` (no copy)."""
    shared = {id(tensor): tensor for tensor in itertools.chain(unet.parameters(), unet.buffers())}
    return torch.compile(copy.deepcopy(unet, memo=shared).eval())


def load_policy(config: TrainConfig, device: torch.device, channels_last: bool) -> Policy:
    """Load the base, move it to ``device`` in the configured precision and add a Gaussian-initialised LoRA
    (drawn from torch's global generator: seed it first). ``channels_last`` is off under DeepSpeed, which
    broadcasts each weight viewed as bytes and so needs the default memory layout."""
    from peft import LoraConfig

    pipeline = load_base_pipeline(config.base, config.sampling.scheduler, channels_last=channels_last)
    unet = denoiser_of(pipeline)
    _check_lora_targets(unet, config.lora.target_modules)
    base_hash = weights_hash(unet)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    pipeline.to(device)
    if weight_dtype != torch.float32:
        pipeline.to(dtype=weight_dtype)
    frozen_hash = weights_hash(unet)
    reference_unet = _compiled_reference(unet) if config.train.compile else None
    unet.add_adapter(LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, init_lora_weights="gaussian",
                                target_modules=config.lora.target_modules))
    for parameter in unet.parameters():  # LoRA trains in float32 whatever the base dtype
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if config.train.gradient_checkpointing:  # pathwise also backpropagates through the VAE decoder
        unet.enable_gradient_checkpointing(checkpoint_keeping_adapter_routing)
        family_of(pipeline).enable_vae_gradient_checkpointing(pipeline)
    return Policy(pipeline=pipeline, lora_parameters=[p for p in unet.parameters() if p.requires_grad],
                  sampling_unet=torch.compile(unet) if config.train.compile else unet,
                  reference_unet=reference_unet, base_hash=base_hash, frozen_hash=frozen_hash)
