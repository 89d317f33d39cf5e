"""The flow world's speed: trained transitions per second against the UNet world, and MSDDA (K = 2) against one adapter.

    .venv/bin/python benchmarks/flow_world_speed.py [--epochs 4] [--steps 10] [--repeats 3]

Training: each world's aesthetic recipe (configs/train/world_aesthetic.yaml on ``world``,
configs/train/world_flow_aesthetic.yaml on ``world-flow``: pathwise through the tweedie step reward, KL on) with
the same trajectories per epoch, step count, guidance and train batch, 2 CPU threads, both measured in this run. A
transition is one denoising step of one trajectory that is sampled, scored and trained on; the first epoch warms
up and is not counted, rates are the median over the others. The two denoisers differ in size, so their model FLOPs
per forward of one latent (``torch.utils.flop_counter``) are printed and the rates are compared as they are and
per model FLOP (transitions/s x FLOPs per forward: the model FLOP rate each trainer reaches).

Fusion: on the flow world, time per image of MSDDA with two adapters (one batched transformer forward of 2 x 2 rows
per step with guidance) against ``single`` with one, same prompts, seeds and step count (goal: at most 2.2x). The
adapters are the flow recipes trained for one epoch in this run (their weights do not change the time).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from fuse_speed import seconds_per_image  # the timing rule of benchmarks/fuse_speed.py

from msdda.config import load_config
from msdda.diffusion import denoiser_forward, encode_prompts, load_base_pipeline
from msdda.train import TrainConfig, train
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"world": ROOT / "configs/train/world_aesthetic.yaml",
           "world-flow": ROOT / "configs/train/world_flow_aesthetic.yaml"}
PROMPT = "a red circle on the left"


def _overrides(args: argparse.Namespace, folder: str, epochs: int) -> list[str]:
    return [f"epochs={epochs}", f"sampling.num_inference_steps={args.steps}", f"sampling.batch_size={args.batch}",
            f"sampling.batches_per_epoch={args.batches}", f"train.batch_size={args.batch}", "sample_every=0",
            "log_with=null", f"checkpoint.every={10 * epochs}", f"output_dir={folder}/run"]


def epoch_seconds(base: str, args: argparse.Namespace) -> list[float]:
    """The seconds of each epoch of ``base``'s aesthetic recipe at the benchmark's sizes."""
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(load_config(TrainConfig, RECIPES[base], _overrides(args, folder, args.epochs)))
        trainer.run()
        return [h["epoch_seconds"] for h in trainer.history]


def forward_flops(base: str) -> int:
    """Model FLOPs of one denoiser forward of one latent with its prompt's conditioning (no guidance)."""
    from torch.utils.flop_counter import FlopCounterMode

    pipeline = load_base_pipeline(base, "flow" if base == "world-flow" else "ddim")
    denoiser = pipeline.transformer if base == "world-flow" else pipeline.unet
    conditioning, _ = encode_prompts(pipeline, [PROMPT], torch.device("cpu"))
    sample = torch.randn(1, 4, 16, 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        denoiser_forward(denoiser, sample, torch.tensor([500.0]), conditioning)
    return counter.get_total_flops()


def fusion_ratio(args: argparse.Namespace) -> tuple[float, float]:
    """(single-adapter, MSDDA K = 2) seconds per image on the flow world."""
    from msdda.fuse import MSDDAPipeline

    with tempfile.TemporaryDirectory() as folder:
        adapters = []
        for name in ("aesthetic", "thirds"):
            overrides = _overrides(argparse.Namespace(steps=args.steps, batch=2, batches=1), f"{folder}/{name}", 1)
            adapters.append(str(train(load_config(TrainConfig, ROOT / f"configs/train/world_flow_{name}.yaml",
                                                  overrides))))
        pipe = MSDDAPipeline.from_pretrained("world-flow", adapters=adapters)
        pipe.set_progress_bar_config(disable=True)

        def sample(weights, method):
            return lambda: pipe([PROMPT] * args.fuse_batch, weights=weights, method=method,
                                num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                                output_type="pt")

        single = seconds_per_image(sample([1.0, 0.0], "single"), args.fuse_batch, args.repeats)
        fused = seconds_per_image(sample([0.5, 0.5], "msdda"), args.fuse_batch, args.repeats)
    return single, fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--fuse-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transitions = args.batch * args.batches * args.steps
    rates, flops = {}, {}
    for base in RECIPES:
        seconds = epoch_seconds(base, args)[1:]  # the first epoch warms up
        rates[base] = transitions / statistics.median(seconds)
        flops[base] = forward_flops(base)
        print(f"{base:>10}: {statistics.median(seconds):6.2f} s/epoch, {rates[base]:6.1f} transitions/s, "
              f"{flops[base] / 1e6:7.1f} MFLOPs per forward of one latent "
              f"(epochs {', '.join(f'{s:.2f}' for s in seconds)})")
    single, fused = fusion_ratio(args)
    print(f"flow world, batch {args.fuse_batch}, {args.steps} steps: single {single:.4f} s/image, "
          f"msdda K=2 {fused:.4f} s/image")
    print()
    print(f"model FLOPs per forward, world-flow / world: {flops['world-flow'] / flops['world']:.2f}")
    print(f"transitions/s, world-flow / world: {rates['world-flow'] / rates['world']:.2f}x")
    print(f"model FLOP rate (transitions/s x FLOPs per forward), world-flow / world: "
          f"{rates['world-flow'] * flops['world-flow'] / (rates['world'] * flops['world']):.2f}x")
    print(f"flow world time per image, msdda K=2 / single: {fused / single:.2f} (goal: at most 2.2)")


if __name__ == "__main__":
    main()
