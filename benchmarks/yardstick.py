"""A CPU yardstick for wall times: the embedded world UNet's forward pass, in milliseconds.

    python benchmarks/yardstick.py [--batch 64] [--repeats 20]

Machines differ in speed by 2-3x, so a wall time means little without the machine it ran on. The demo's work
is almost all world-UNet forwards and backwards at the batch it uses (16 prompts, guidance doubles the rows),
so this one number, printed beside a wall time, lets a reader scale it to their machine: a machine whose
yardstick is twice this one's runs the demo in about twice the time. Needs no model hub and nothing beyond
msdda; the UNet's weights do not matter for the time, the world's shipped ones are used.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from msdda.diffusion import load_base_pipeline
from msdda.world.models import MAX_PROMPT_TOKENS


def unet_forward_milliseconds(batch: int, repeats: int) -> float:
    """The median time of one world-UNet forward over ``batch`` rows, after two warm-up calls."""
    unet = load_base_pipeline("world").unet.eval()
    rows = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                       generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(batch, MAX_PROMPT_TOKENS, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor(500)
    times = []
    with torch.no_grad():
        for index in range(repeats + 2):
            started = time.perf_counter()
            unet(rows, timestep, embeds)
            if index >= 2:
                times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="rows per forward (the demo's: 32 images x 2)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    milliseconds = unet_forward_milliseconds(args.batch, args.repeats)
    print(f"yardstick: world UNet forward, {args.batch} rows, {torch.get_num_threads()} threads: "
          f"{milliseconds:.1f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
