"""On the analytic world, the path KL the sampler records from a method's kernels to the exact weighted step
optimum, along the method's own trajectory: ~0 for MSDDA at unequal betas and weights off the simplex (its
fused kernel is that optimum), clearly not 0 for output averaging (it ignores the betas and normalises w)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from msdda.diffusion import BASE
from msdda.fuse.methods import FusionContext, PathKL, get_method
from msdda.kernels import StepKernel
from msdda.world.analytic import GaussianWorld

OPTIMUM = "optimum"
SAMPLES = 16


@dataclass(frozen=True)
class AnalyticContext(FusionContext):
    """The registry's methods on the analytic world: adapter i is reward i's exact step optimum at its beta_i,
    "__base__" the exact reference, "optimum" the exact optimum of sum_i w_i r_i at the fused beta."""

    world: GaussianWorld | None = None
    reward_vectors: tuple[torch.Tensor, ...] = ()
    betas: tuple[float, ...] = ()
    beta: float = 0.0

    def kernels(self, latents, timestep, names, positive=None, negative=None) -> list[StepKernel]:
        kernels = [self._kernel(latents, int(timestep), name) for name in names]
        if self.path_kl is not None:
            self.path_kl.remember(latents, timestep, names, kernels)
        return kernels

    def _kernel(self, x_t: torch.Tensor, timestep: int, name: str) -> StepKernel:
        world = self.world
        if name == BASE:
            return world.reference_kernel(x_t, timestep)
        if name == OPTIMUM:
            return world.optimal_kernel(x_t, timestep, self.reward_vectors, self.weights, self.beta)
        index = self.adapter_names.index(name)
        return world.optimal_kernel(x_t, timestep, [self.reward_vectors[index]], [1.0], self.betas[index])


def _path_kls(method_name: str, weights: list[float], betas: list[float], beta: float) -> dict[str, torch.Tensor]:
    world = GaussianWorld.default(dim=3, num_inference_steps=20, seed=0)
    generator = torch.Generator().manual_seed(11)
    rewards = tuple(torch.randn(world.dim, generator=generator, dtype=torch.float64) for _ in weights)
    method = get_method(method_name)
    context = AnalyticContext(
        unet=None, scheduler=world.scheduler, positive=torch.zeros(SAMPLES, 1, dtype=torch.float64), negative=None,
        adapter_names=[f"adapter_{i}" for i in range(len(weights))], weights=weights,
        exponents=method.exponents(weights, betas, beta), guidance_scale=1.0, eta=None,
        generator=torch.Generator().manual_seed(0), path_kl=PathKL.zeros([OPTIMUM, BASE], SAMPLES),
        world=world, reward_vectors=rewards, betas=tuple(betas), beta=beta)
    start = torch.randn(SAMPLES, world.dim, generator=generator, dtype=torch.float64)
    method.sample(context, start, world.scheduler.timesteps)
    return context.path_kl.totals


@pytest.mark.parametrize("weights, betas, beta", [
    ([0.6, 0.3], [0.05, 0.2], 0.1),  # l = (0.3, 0.6): the reference enters with exponent 0.1
    ([0.3, 0.3, 0.1], [0.1, 0.2, 0.1], 0.15),  # K = 3, sum w = 0.7
])
def test_msdda_is_the_weighted_optimum_along_its_path_and_output_averaging_is_not(weights, betas, beta) -> None:
    fused = _path_kls("msdda", weights, betas, beta)
    averaged = _path_kls("output-average", weights, betas, beta)
    assert bool((fused[BASE] > 1.0).all())  # the optimum is far from the reference: the test has power
    assert float(fused[OPTIMUM].max()) < 1e-12 * float(fused[BASE].min())
    assert bool((averaged[OPTIMUM] > 1e-2 * averaged[BASE]).all())
