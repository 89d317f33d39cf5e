"""Time per image of MSDDA with K adapters against K sequential single-adapter forwards and plain sampling.

    python benchmarks/fuse_speed.py [--steps 20] [--repeats 3]

All on the embedded world with random-weight adapters, same prompts, seeds and step count, measured in this
run; prints the ratios last. "sequential" runs the same fusion but with one UNet forward per adapter per step
(switching adapters with set_adapters), which is what calling K pipelines would cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from msdda.fuse import MSDDAPipeline, exponents, fuse_gaussians
from msdda.kernels import StepKernel, step_kernel
from msdda.sampling import denoise
from msdda.testing import random_world_adapter

PROMPT = "a red circle on the left"


def sequential_fused(pipe: MSDDAPipeline, batch: int, steps: int, seed: int) -> None:
    """MSDDA with one forward per adapter per step (the cost MSDDA's batched forward avoids)."""
    generator = torch.Generator().manual_seed(seed)
    positive, negative = pipe.encode_prompt([PROMPT] * batch, "cpu", 1, True)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    names = [a.name for a in pipe.adapters]
    powers = exponents([1.0 / len(names)] * len(names))

    def fused_kernel(_index: int, timestep: torch.Tensor, x_t: torch.Tensor) -> StepKernel:
        kernels = []
        for name in names:
            pipe.set_adapters([name])
            output = pipe.unet(torch.cat([x_t] * 2), timestep, torch.cat([negative, positive])).sample
            unconditional, conditional = output.chunk(2)
            kernels.append(step_kernel(scheduler, unconditional + 3.0 * (conditional - unconditional), timestep,
                                       x_t, eta=1.0))
        mean, variance = fuse_gaussians([k.mean for k in kernels], [k.variance for k in kernels], powers)
        return StepKernel(mean=mean, variance=variance)

    denoise(scheduler.timesteps, latents, fused_kernel, generator, positive)
    pipe.set_adapters(names, [1.0] * len(names))


def seconds_per_image(run, batch: int, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        adapters = [str(random_world_adapter(Path(folder) / f"a{i}", seed=i, num_inference_steps=args.steps))
                    for i in range(3)]
        pipes = {k: MSDDAPipeline.from_pretrained("world", adapters=adapters[:k]) for k in (1, 2, 3)}
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
        rows = []
        for batch in (1, 16):
            def sample(pipe, weights, method="msdda", batch=batch):
                return lambda: pipe([PROMPT] * batch, weights=weights, method=method, num_inference_steps=args.steps,
                                    generator=torch.Generator().manual_seed(0), output_type="pt")

            single = seconds_per_image(sample(pipes[1], [1.0], "single"), batch, args.repeats)
            for k in (2, 3):
                fused = seconds_per_image(sample(pipes[k], [1.0 / k] * k), batch, args.repeats)
                sequential = seconds_per_image(
                    lambda k=k, batch=batch: sequential_fused(pipes[k], batch, args.steps, 0), batch, args.repeats)
                rows.append((batch, k, single, fused, sequential))
    print(f"{'batch':>5} {'K':>2} {'single s/img':>13} {'msdda s/img':>12} {'sequential s/img':>17}")
    for batch, k, single, fused, sequential in rows:
        print(f"{batch:>5} {k:>2} {single:>13.4f} {fused:>12.4f} {sequential:>17.4f}")
    print("\nratios (goal: msdda / single <= 1.1 * K)")
    for batch, k, single, fused, sequential in rows:
        print(f"batch {batch:>2} K={k}: msdda/single = {fused / single:.2f} (K = {k}, 1.1K = {1.1 * k:.1f}); "
              f"sequential/single = {sequential / single:.2f}; msdda/sequential = {fused / sequential:.2f}")


if __name__ == "__main__":
    main()
