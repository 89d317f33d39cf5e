"""Activation memory of one trained Stable Diffusion 1.5 step, measured on randomly initialised full-size models.

Builds SD 1.5's UNet (with the recipes' rank-4 attention LoRA), VAE decoder and CLIP ViT-H/14 vision tower from
their configs in bf16 on the CPU, runs one forward with grad per component at batch 1, and sums the bytes of
the distinct tensors autograd saves for the backward pass (``saved_tensors_hooks``). Saved activations are what
grows with the batch; weights are in ``sd_parameter_memory.py``. Attention runs through PyTorch's SDPA, whose
CPU and GPU flash kernels both save only the output and the log-sum-exp, not the attention matrix.
Transient workspace (the largest single op's temporaries) comes on top and is not counted.

    .venv/bin/python scripts/sd_activation_memory.py        # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

GIB = 2**30


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``forward`` runs (then backpropagated)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    output.float().square().mean().backward()
    return sum(storages.values())


def unet_rows(checkpointing: bool) -> int:
    """One UNet row (a 512x512 image's 64x64 latent, 77 text tokens), LoRA rank 4 trained, base frozen."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).to(torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for parameter in unet.parameters():  # as the trainer does: LoRA in float32 on a bf16 base
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    latents = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16)
    text = torch.randn(1, 77, 768, dtype=torch.bfloat16)
    return saved_bytes(lambda: unet(latents, 500, encoder_hidden_states=text).sample)


def vae_decode() -> int:
    """The pathwise estimator's decode of one 64x64 latent to a 512x512 image, with grad to the latent."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae = vae.to(torch.bfloat16).requires_grad_(False)
    latents = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    return saved_bytes(lambda: vae.decode(latents).sample)


def clip_vit_h() -> int:
    """PickScore's / HPSv2's image tower on one 224x224 image, with grad to the pixels."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, attn_implementation="sdpa")).to(torch.bfloat16).requires_grad_(False)
    pixels = torch.randn(1, 3, 224, 224, dtype=torch.bfloat16, requires_grad=True)
    return saved_bytes(lambda: model(pixel_values=pixels).image_embeds)


def main() -> None:
    torch.manual_seed(0)
    rows = [("UNet, 1 row, LoRA rank 4", lambda: unet_rows(False)),
            ("UNet, 1 row, gradient checkpointing", lambda: unet_rows(True)),
            ("VAE decoder, 1 image 512x512 (pathwise only)", vae_decode),
            ("CLIP ViT-H/14 vision, 1 image (pathwise only)", clip_vit_h)]
    print("| component (bf16) | saved activations | measured in |\n| --- | --- | --- |")
    for name, measure in rows:
        started = time.time()
        print(f"| {name} | {measure() / GIB:.2f} GiB | {time.time() - started:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
