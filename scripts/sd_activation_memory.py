"""Activation memory of one trained Stable Diffusion 1.5 step, measured on randomly initialised full-size models.

Builds SD 1.5's UNet (with the recipes' rank-4 attention LoRA), VAE decoder and CLIP ViT-H/14 vision tower from
their configs in bf16 on the CPU, runs one forward with grad per component at batch 1, and sums the bytes of
the distinct tensors autograd saves for the backward pass (``saved_tensors_hooks``), less the weights it
saves by reference. Saved activations are what grows with the batch; weights are in ``sd_parameter_memory.py``. Attention runs through PyTorch's SDPA, whose
CPU and GPU flash kernels both save only the output and the log-sum-exp, not the attention matrix.
Transient workspace (the largest single op's temporaries) comes on top and is not counted.

    .venv/bin/python scripts/sd_activation_memory.py        # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

GIB = 2**30


def saved_bytes(module: torch.nn.Module, forward: Callable[[], torch.Tensor],
                segments: list[torch.nn.Module] = ()) -> tuple[int, int]:
    """Bytes of the distinct storages autograd keeps for backward while ``forward`` runs (then backpropagated),
    the module's own weights excluded (autograd saves them too, but they are counted as weights); and the most
    that any one of ``segments`` saved, which is what gradient checkpointing recomputes at once in backward."""
    weights = {tensor.untyped_storage().data_ptr() for tensor in [*module.parameters(), *module.buffers()]}
    storages: dict[int, int] = {}
    per_segment: dict[int, int] = {}
    active: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = storage.nbytes()
            if active:
                per_segment[active[-1]] = per_segment.get(active[-1], 0) + storage.nbytes()
        return tensor

    def leave(*_) -> None:
        active.pop()

    handles = []
    for index, segment in enumerate(segments):
        handles.append(segment.register_forward_pre_hook(lambda *_, index=index: active.append(index)))
        handles.append(segment.register_forward_hook(leave))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    for handle in handles:
        handle.remove()
    output.float().square().mean().backward()
    return sum(storages.values()), max(per_segment.values(), default=0)


def unet_rows(checkpointing: bool) -> tuple[int, int]:
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
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    checkpointed = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]
    return saved_bytes(unet, lambda: unet(latents, 500, encoder_hidden_states=text).sample, checkpointed)


def vae_decode(checkpointing: bool) -> tuple[int, int]:
    """The pathwise estimator's decode of one 64x64 latent to a 512x512 image, with grad to the latent."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae = vae.to(torch.bfloat16).requires_grad_(False)
    if checkpointing:
        vae.enable_gradient_checkpointing()
    latents = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    checkpointed = [vae.decoder.mid_block, *vae.decoder.up_blocks]
    return saved_bytes(vae, lambda: vae.decode(latents).sample, checkpointed)


def clip_vit_h() -> tuple[int, int]:
    """PickScore's / HPSv2's image tower on one 224x224 image, with grad to the pixels."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, attn_implementation="sdpa")).to(torch.bfloat16).requires_grad_(False)
    pixels = torch.randn(1, 3, 224, 224, dtype=torch.bfloat16, requires_grad=True)
    return saved_bytes(model, lambda: model(pixel_values=pixels).image_embeds)


def main() -> None:
    torch.manual_seed(0)
    print("| component (bf16, batch 1) | saved activations | with gradient checkpointing: saved + largest segment "
          "recomputed in backward |\n| --- | --- | --- |")
    for name, measure in (("UNet, 1 row (64x64 latent, 77 tokens), LoRA rank 4", unet_rows),
                          ("VAE decoder, 1 image 512x512 (pathwise only)", vae_decode)):
        plain, largest = measure(False)
        checkpointed, _ = measure(True)
        print(f"| {name} | {plain / GIB:.2f} GiB | {checkpointed / GIB:.2f} + {largest / GIB:.2f} GiB |", flush=True)
    plain, _ = clip_vit_h()
    print(f"| CLIP ViT-H/14 vision, 1 image 224x224 (pathwise only) | {plain / GIB:.2f} GiB | not checkpointed |")


if __name__ == "__main__":
    main()
