"""Parameter counts and weight memory of the Stable Diffusion 1.5 recipes' models, from their configs.

Builds each model on PyTorch's meta device (no weights, no download) and counts its parameters; weight memory
is parameters x bytes per parameter. Activation memory depends on the GPU kernels and is not computed here.

    .venv/bin/python scripts/sd_parameter_memory.py
"""

from __future__ import annotations

import torch


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import BlipConfig, BlipForImageTextRetrieval, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(  # Stable Diffusion 1.5's UNet config
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768))
        vit_l = CLIPModel(CLIPConfig(  # openai/clip-vit-large-patch14 (CLIP score, LAION aesthetic)
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               patch_size=14, image_size=224), projection_dim=768))
        vit_h = CLIPModel(CLIPConfig(  # laion/CLIP-ViT-H-14 (PickScore, HPSv2)
            text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               patch_size=14, image_size=224), projection_dim=1024))
        blip = BlipForImageTextRetrieval(BlipConfig(  # ImageReward's BLIP (ViT-L/16 at 224, BERT-base text)
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=16),
            text_config=dict(encoder_hidden_size=1024)))
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = sum(v.numel() for v in get_peft_model_state_dict(unet).values())
    rows = [("SD 1.5 UNet", count(unet) - lora), ("SD 1.5 VAE", count(vae)), ("SD 1.5 text encoder", count(text)),
            ("LoRA rank 4 on attention (trained)", lora), ("CLIP ViT-L/14 (clip-score, laion-aesthetic)", count(vit_l)),
            ("CLIP ViT-H/14 (pickscore, hpsv2)", count(vit_h)), ("BLIP ITM (imagereward)", count(blip))]
    print("| model | parameters | bf16 weights | fp32 weights |\n| --- | --- | --- | --- |")
    for name, parameters in rows:
        print(f"| {name} | {parameters / 1e6:.1f} M | {parameters * 2 / 2**30:.2f} GiB | {parameters * 4 / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
