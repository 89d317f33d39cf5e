"""Training memory of the Qwen-Image and FLUX.2 recipes on paper: parameter counts of their full-size models from
their configs, LoRA and optimizer memory, and the transformer's activations under gradient checkpointing.

As scripts/sd_parameter_memory.py does, each model is built on PyTorch's meta device (no weights, no download) and its
parameters counted; weights are bf16 (the recipes' mixed precision), the LoRA trains in float32 with AdamW (weights,
gradients and two moments: 16 bytes per parameter). The transformer's activations are estimated, not measured: with
gradient checkpointing each block keeps its input (image and text tokens x width, bf16) and the one block being
recomputed holds about 34 x tokens x width bytes (Korthikanti et al., 2022, for a bf16 transformer layer whose
attention kernel saves no score matrix), for every row of a guided forward (two per trajectory where the family runs
classifier-free guidance). The VAE decoder's and the reward model's activations (the pathwise estimator
backpropagates through both) come on top and are not estimated here.

    .venv/bin/python scripts/flow_parameter_memory.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2**30


@dataclass
class Recipe:
    name: str
    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    lora_targets: list[str]
    width: int
    blocks: int
    image_tokens: int
    text_tokens: int
    rows_per_trajectory: int
    batch: int


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def recipes() -> list[Recipe]:
    from diffusers import (
        AutoencoderKLFlux2,
        AutoencoderKLQwenImage,
        Flux2Transformer2DModel,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    with torch.device("meta"):
        qwen = Recipe(  # Qwen/Qwen-Image: the transformer's and the VAE's defaults are Qwen-Image's configs
            "Qwen-Image (configs/train/qwen_image_*.yaml: 512 px, 128 text tokens, true CFG, 4 per GPU)",
            QwenImageTransformer2DModel(),
            Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(  # Qwen2.5-VL-7B-Instruct
                text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4),
                vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=3584))),
            AutoencoderKLQwenImage(),
            ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
             "txt_mlp.net.2"],
            width=3072, blocks=60, image_tokens=(512 // 16) ** 2, text_tokens=128, rows_per_trajectory=2, batch=4)
        flux2 = Recipe(  # black-forest-labs/FLUX.2-dev: the transformer's defaults are FLUX.2 [dev]'s config
            "FLUX.2 [dev] (configs/train/flux2_*.yaml: 512 px, 512 text tokens, distilled guidance, 2 per GPU)",
            Flux2Transformer2DModel(),
            Mistral3ForConditionalGeneration(Mistral3Config(  # Mistral Small 3.1 24B
                text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                                 num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
                vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096,
                                   num_hidden_layers=24, num_attention_heads=16, head_dim=64),
                spatial_merge_size=2)),
            AutoencoderKLFlux2(),
            ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "attn.to_qkv_mlp_proj"],
            width=6144, blocks=8 + 48, image_tokens=(512 // 16) ** 2, text_tokens=512, rows_per_trajectory=1,
            batch=2)
    return [qwen, flux2]


def main() -> None:
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        reward = CLIPModel(CLIPConfig(  # laion/CLIP-ViT-H-14 (PickScore)
            text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               patch_size=14, image_size=224), projection_dim=1024))
    for recipe in recipes():
        with torch.device("meta"):
            recipe.transformer.add_adapter(LoraConfig(r=64, lora_alpha=128, target_modules=recipe.lora_targets))
        lora = sum(v.numel() for v in get_peft_model_state_dict(recipe.transformer).values())
        frozen = {"transformer": count(recipe.transformer) - lora, "text encoder": count(recipe.text_encoder),
                  "VAE": count(recipe.vae), "PickScore (CLIP ViT-H/14)": count(reward)}
        tokens = recipe.image_tokens + recipe.text_tokens
        rows = recipe.rows_per_trajectory * recipe.batch
        kept = recipe.blocks * tokens * recipe.width * 2 * rows
        recomputed = 34 * tokens * recipe.width * rows
        print(f"\n### {recipe.name}\n\n| part | parameters | memory |\n| --- | --- | --- |")
        for name, parameters in frozen.items():
            print(f"| {name} (bf16) | {parameters / 1e9:.2f} B | {parameters * 2 / GIB:.1f} GiB |")
        print(f"| LoRA rank 64 (fp32 weights, gradients, AdamW moments) | {lora / 1e6:.0f} M | "
              f"{lora * 16 / GIB:.1f} GiB |")
        print(f"| transformer activations, {rows} rows of {tokens} tokens, checkpointed: block inputs | | "
              f"{kept / GIB:.1f} GiB |")
        print(f"| transformer activations: the block recomputed in backward | | {recomputed / GIB:.1f} GiB |")
        total = sum(frozen.values()) * 2 + lora * 16 + kept + recomputed
        print(f"| total before the VAE decoder's and the reward's activations | | {total / GIB:.1f} GiB |")


if __name__ == "__main__":
    main()
