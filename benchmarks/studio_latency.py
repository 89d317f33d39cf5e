"""Latency of one slider change in msdda studio against plain single-adapter sampling of the same images.

    python benchmarks/studio_latency.py [--adapter DIR ...] [--steps 10] [--repeats 5]

A slider change runs what the page's two events call: ``Studio.render(defer_kl=True)`` (MSDDA over every adapter
for the grid's 4 images, their rewards and the images' conversion: what the page shows first), then the render's
``with_kl()`` (the path KLs to the base along the same trajectories: shown next). The baseline is
``method="single"`` through the same pipeline: the same 4 images with one adapter, no rewards, no KL. All on the
embedded world, after a warm-up, median of the repeats, in this run; prints the times and the ratio of the
images' time to the baseline's last. Without ``--adapter`` it uses the adapters the studio opens with, the shipped
reference adapters (rank 8, on attention and convolutions).
"""

from __future__ import annotations

import argparse

import torch

from fuse_speed import seconds_per_image  # the timing rule of benchmarks/fuse_speed.py (per call: batch 1)
from msdda.studio.cli import DEFAULT_ADAPTERS
from msdda.studio.core import GRID_SIZE, Studio

PROMPT = "a red circle on the left"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder or world:<name> (repeat; "
                        f"default: {', '.join(DEFAULT_ADAPTERS)})")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapters = args.adapter or DEFAULT_ADAPTERS
    studio = Studio.load("world", adapters, device="cpu")
    count = len(adapters)
    weights = [[1.0 / count] * count, [0.6] + [0.4 / (count - 1)] * (count - 1) if count > 1 else [1.0]]
    moves = iter(range(10**6))  # alternate two weight vectors, as a slider moving back and forth does

    def images():
        return studio.render(weights[next(moves) % 2], "msdda", steps=args.steps, seed=0, prompt=PROMPT,
                             defer_kl=True)

    def slider_change():
        return images().with_kl()

    def single():
        return studio.pipeline([PROMPT] * GRID_SIZE, weights=[1.0] + [0.0] * (count - 1), method="single",
                               num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                               output_type="pil")

    shown_seconds = seconds_per_image(images, 1, args.repeats)
    studio_seconds = seconds_per_image(slider_change, 1, args.repeats)
    single_seconds = seconds_per_image(single, 1, args.repeats)
    print(f"{count} adapters, {GRID_SIZE} images, {args.steps} steps, {args.threads} threads, median of {args.repeats}")
    print(f"studio slider change, the grid and its rewards (msdda): {shown_seconds:.3f} s")
    print(f"  ... and then its path KLs (the whole change):        {studio_seconds:.3f} s")
    print(f"single-adapter sampling of the same images:             {single_seconds:.3f} s")
    print(f"\nratio grid / single = {shown_seconds / single_seconds:.2f} (goal: the grid under 1 s: "
          f"{'yes' if shown_seconds < 1 else 'no'}; with its KLs: {'yes' if studio_seconds < 1 else 'no'})")


if __name__ == "__main__":
    main()
