"""Reward-gradient guidance (method ``rgg``): exact on the analytic worlds, end to end on the embedded one.

On the analytic worlds the rewards are linear, so the ``tweedie`` step reward is linear in x_{t-1} and the first-order
step optimum is the exact one: RGG at scale s_t^2 / beta must equal the closed-form optimal kernel for the weighted
reward, step by step and over the whole chain. The method runs there through its own ``kernel`` with the world's exact
denoiser in place of a UNet, so the choice of the next timestep and of the point the gradient is taken at are tested
too, not only the arithmetic.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from msdda.cli import main
from msdda.errors import UserError
from msdda.fuse import MSDDAPipeline
from msdda.fuse.methods import FusionContext, get_method
from msdda.rewards import load_reward
from msdda.testing import random_world_adapter
from msdda.world.analytic import FlowGaussianWorld, GaussianWorld

WORLDS = {
    "ddpm": lambda: GaussianWorld.default(dim=3, num_inference_steps=10, seed=0),
    "ddpm-learned-variance": lambda: GaussianWorld.default(dim=3, num_inference_steps=10, seed=0,
                                                           variance_type="learned_range"),
    "flow-sde": lambda: FlowGaussianWorld.default(dim=3, num_inference_steps=10, seed=0),
    "flow-stochastic-sampling": lambda: FlowGaussianWorld.default(dim=3, num_inference_steps=10, seed=0,
                                                                  stochastic_sampling=True),
}
WEIGHTS, BETA = [0.3, 1.2], 0.05  # off the simplex: RGG takes the weights as given, like the objective


class ExactDenoiser(torch.nn.Module):
    """An analytic world's exact reference model, called as msdda calls a UNet: (sample, timestep, conditioning)."""

    def __init__(self, world: GaussianWorld | FlowGaussianWorld) -> None:
        super().__init__()
        self.world = world

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: torch.Tensor) -> SimpleNamespace:
        if isinstance(self.world, GaussianWorld):
            return SimpleNamespace(sample=self.world.reference_output(sample, int(timestep)))
        return SimpleNamespace(sample=self.world.velocity(sample, float(timestep)))


def _reward_vectors(dim: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(dim, generator=generator, dtype=torch.float64) for _ in WEIGHTS]


def _context(world, batch: int, scale: float | str) -> FusionContext:
    """A fusion call on ``world``: linear rewards r_i(x0) = a_i . x0 of the clean state ("decoding" is the identity)."""
    vectors = _reward_vectors(world.dim)

    def reward(images: torch.Tensor, prompts, grad: bool = False) -> torch.Tensor:
        return sum(w * images @ a for w, a in zip(WEIGHTS, vectors))

    return FusionContext(unet=ExactDenoiser(world), scheduler=world.scheduler,
                         positive=torch.zeros(batch, 1, dtype=torch.float64), negative=None,
                         adapter_names=["a", "b"], weights=WEIGHTS, exponents=WEIGHTS, guidance_scale=1.0,
                         eta=getattr(world, "flow_noise_level", None), generator=torch.Generator().manual_seed(0),
                         prompts=["p"] * batch, reward=reward, decode=lambda x, grad=False: x, beta=BETA,
                         rgg_scale=scale)


@pytest.mark.parametrize("name", list(WORLDS))
def test_rgg_at_the_optimal_scale_is_the_closed_form_step_optimum(name: str) -> None:
    world = WORLDS[name]()
    x_t = torch.randn(4, world.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    context, rgg = _context(world, len(x_t), "optimal"), get_method("rgg")
    for index, timestep in enumerate(world.scheduler.timesteps):
        kernel = rgg.kernel(context, index, timestep, x_t)
        optimum = world.optimal_kernel(x_t, world.timesteps[index], _reward_vectors(world.dim), WEIGHTS, BETA)
        torch.testing.assert_close(kernel.mean, optimum.mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(kernel.variance.expand_as(kernel.mean),
                                   torch.as_tensor(optimum.variance).expand_as(kernel.mean), rtol=0, atol=0)
        assert (kernel.mean != world.reference_kernel(x_t, world.timesteps[index]).mean).any() or \
            kernel.is_deterministic  # every stochastic step moves


def test_a_constant_scale_moves_every_stochastic_step_by_the_scale_times_the_step_rewards_gradient() -> None:
    world, scale = WORLDS["ddpm"](), 0.3
    x_t = torch.randn(2, world.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    context = _context(world, len(x_t), scale)
    for index, timestep in enumerate(world.timesteps):
        reference = world.reference_kernel(x_t, timestep)
        kernel = get_method("rgg").kernel(context, index, world.scheduler.timesteps[index], x_t)
        gradient = sum(w * world.tweedie_reward_gradient(timestep, a) for w, a in zip(WEIGHTS, _reward_vectors()))
        expected = reference.mean if reference.is_deterministic else reference.mean + scale * gradient
        torch.testing.assert_close(kernel.mean, expected, rtol=0, atol=1e-10)


def test_the_rgg_chain_has_the_optimal_chains_exact_moments() -> None:
    """Every step optimal makes the whole chain the chain of step optima: its x0 moments, propagated exactly."""
    world = WORLDS["ddpm"]()
    context, rgg = _context(world, world.dim + 1, "optimal"), get_method("rgg")
    index = {timestep: i for i, timestep in enumerate(world.timesteps)}
    moments = world.chain_moments(
        lambda x_t, timestep: rgg.kernel(context, index[timestep], world.scheduler.timesteps[index[timestep]], x_t))
    mean, cov = world.optimal_chain_moments(_reward_vectors(), WEIGHTS, BETA)
    torch.testing.assert_close(moments[-1][0], mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(moments[-1][1], cov, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------- the embedded world
PROMPTS = ["a red circle on the left", "a blue square at the top"]
STEPS = 3


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("rgg_adapters")
    return [str(random_world_adapter(root / name, seed, num_inference_steps=STEPS)) for name, seed in
            (("a", 1), ("b", 2))]


@pytest.fixture(scope="module")
def pipeline(adapters):
    pipe = MSDDAPipeline.from_pretrained("world", adapters=adapters)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipeline, rewards, **settings):
    return pipeline(PROMPTS, weights=[0.5, 0.5], method="rgg", rewards=rewards, output_type="pt", return_kl=True,
                    generator=torch.Generator().manual_seed(0), **settings)


def test_rgg_samples_the_world_with_its_rewards_and_a_path_kl_that_grows_with_the_scale(pipeline) -> None:
    rewards = [load_reward("world-aesthetic"), load_reward("world-consistency")]
    base = pipeline(PROMPTS, weights=[0.5, 0.5], method="base", output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images
    tiny, optimal = _sample(pipeline, rewards, rgg_scale=1e-9), _sample(pipeline, rewards)
    torch.testing.assert_close(tiny.images, base, rtol=0, atol=1e-5)  # no move: the base's own samples
    assert (tiny.kl_to_base < 1e-9).all()
    # at s_t^2 / beta the KL of a step is s_t^2 |grad R_t|^2 / (2 beta^2): positive wherever the rewards have a gradient
    assert (optimal.kl_to_base > 0).all() and torch.isfinite(optimal.images).all()


def test_rgg_refuses_a_reward_without_gradients_and_a_bad_scale(pipeline) -> None:
    with pytest.raises(UserError, match=r"method 'rgg' follows the rewards' gradients.*\['jpeg-compressibility'\] are "
                                        r"not differentiable.*method 'code'"):
        _sample(pipeline, [load_reward("world-aesthetic"), load_reward("jpeg-compressibility")])
    with pytest.raises(UserError, match="rgg_scale=-1.0: give 'optimal'"):
        _sample(pipeline, [load_reward("world-aesthetic")] * 2, rgg_scale=-1.0)
    with pytest.raises(UserError, match="method 'rgg' scores samples while sampling: pass rewards"):
        _sample(pipeline, None)


def test_msdda_fuse_samples_with_rgg_and_refuses_a_reward_without_gradients(adapters, tmp_path, capsys) -> None:
    command = ["fuse", "--adapter", adapters[0], "--adapter", adapters[1], "--method", "rgg", "--prompt", PROMPTS[0],
               "--seeds", "0", "--reward", "world-aesthetic"]
    assert main([*command, "--reward", "world-consistency", "--rgg-scale", "0.5", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "p000_s0000.png").is_file() and (tmp_path / "a" / "grid.png").is_file()
    assert main([*command, "--reward", "jpeg-compressibility", "--out", str(tmp_path / "b")]) != 0
    assert "are not differentiable" in capsys.readouterr().err
    assert main([*command, "--reward", "world-consistency", "--rgg-scale", "big", "--out", str(tmp_path / "c")]) != 0
    assert "rgg_scale" in capsys.readouterr().err
