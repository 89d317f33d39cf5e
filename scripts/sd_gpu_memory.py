"""Peak GPU memory and time of one epoch of the Stable Diffusion 1.5 PickScore recipe, run by the trainer itself
on randomly initialised full-size models.

Builds SD 1.5's UNet, VAE and text encoder, and PickScore's CLIP ViT-H/14, from their configs (random weights,
no download; the tokenizers are a byte-level stand-in, so the two text embedding tables are smaller than the real
ones by under 50 MB), saves them as diffusers/transformers folders, then runs ``configs/train/sd15_pickscore.yaml``
for one epoch per setting below (bf16, 50 steps, guidance 5, sampling batch = train batch, 2 trained steps) and
prints the trainer's own ``peak_memory_gib`` (torch.cuda.max_memory_allocated over the epoch) and epoch time.
This checks the estimates in docs/training.md#memory on a real GPU.

    python scripts/sd_gpu_memory.py            # a GPU with 40 GB or more; the first 7 settings took 5 min on an H100
    python scripts/sd_gpu_memory.py --tiny     # the same path on tiny models (any device), to check the script
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (estimator, gradient checkpointing, train.batch_size): the columns of docs/training.md's table
    ("pathwise", True, 1), ("pathwise", True, 4), ("pathwise", True, 8), ("pathwise", False, 1),
    ("pathwise", False, 4), ("policy-gradient", True, 4), ("policy-gradient", True, 16),
    ("policy-gradient", False, 4),
]


def build_sd15(folder: Path) -> Path:
    """SD 1.5's classes, configs and noise schedule, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from msdda.testing import byte_vocabulary

    vocabulary = byte_vocabulary()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocabulary), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                            tokenizer=CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=77),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def build_pickscore(folder: Path) -> Path:
    """PickScore's layout: a CLIPModel with the ViT-H/14 towers, its tokenizer and 224 px image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from msdda.testing import byte_vocabulary

    vocabulary = byte_vocabulary()
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocabulary), hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           patch_size=14, image_size=224),
        projection_dim=1024)).save_pretrained(folder)
    CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=77).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def run_epoch(base: Path, reward: Path, output_dir: Path, estimator: str, checkpointing: bool, batch: int,
              steps: int) -> dict:
    """One epoch of the recipe with these settings; the trainer's metrics for it."""
    from accelerate.state import AcceleratorState, GradientState

    from msdda.config import load_config
    from msdda.train import TrainConfig
    from msdda.train.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
    GradientState._reset_state()
    config = load_config(TrainConfig, ROOT / "configs/train/sd15_pickscore.yaml", [
        f"base={base}", f"prompts={ROOT / 'configs/prompts/animals.txt'}", f"reward.kwargs.model={reward}",
        f"reward.kwargs.processor={reward}", f"output_dir={output_dir}", "epochs=1", "log_with=null",
        "sample_every=0", f"sampling.num_inference_steps={steps}", f"sampling.batch_size={batch}",
        "sampling.batches_per_epoch=1", f"train.batch_size={batch}", "train.gradient_accumulation_steps=1",
        f"train.timestep_fraction={2 / steps}", f"train.estimator={estimator}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    trainer = Trainer(config)
    try:
        trainer.run()
        return trainer.history[-1]
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same classes, to check the script")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.manual_seed(0)
        if args.tiny:
            from msdda.testing import tiny_clip, tiny_stable_diffusion

            base, reward, steps, settings = tiny_stable_diffusion(scratch / "sd"), tiny_clip(scratch / "pick"), 4, SETTINGS[:2]
        else:
            base, reward, steps, settings = build_sd15(scratch / "sd"), build_pickscore(scratch / "pick"), 50, SETTINGS
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no peak memory)"
        print(f"SD 1.5 PickScore recipe, bf16, {steps} steps, one epoch per row, on {device}\n")
        print("| estimator | gradient checkpointing | train.batch_size | peak GPU memory | epoch time |\n"
              "| --- | --- | --- | --- | --- |")
        for index, (estimator, checkpointing, batch) in enumerate(settings):
            try:
                metrics = run_epoch(base, reward, scratch / f"run{index}", estimator, checkpointing, batch, steps)
            except torch.cuda.OutOfMemoryError:
                print(f"| {estimator} | {'yes' if checkpointing else 'no'} | {batch} | out of memory | |", flush=True)
                continue
            peak = metrics.get("peak_memory_gib")
            print(f"| {estimator} | {'yes' if checkpointing else 'no'} | {batch} | "
                  f"{f'{peak:.1f} GiB' if peak is not None else 'n/a'} | {metrics['epoch_seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
