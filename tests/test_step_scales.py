"""Per-step adapter scales: the fit against the analytic world's closed-form optimum, and their application in the one
guided forward (equal to PEFT's own LoRA scaling, 0 equal to the reference) from an adapter's metadata."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from msdda.adapters import METADATA_FILE
from msdda.diffusion import BASE, adapter_kernels, guided_output, sampler_kernel
from msdda.errors import UserError
from msdda.fuse import MSDDAPipeline
from msdda.step_scales import register_step_scales, registered_step_scales, rescaled_factors, scaled_adapters
from msdda.testing import random_world_adapter
from msdda.train.calibrate import pooled_steps
from msdda.world.analytic import GaussianWorld
from tests.test_gauge import gauge_of_shifted_kernel

STEPS = 4
PROMPT = "a red circle on the left"


def test_the_fitted_factors_undo_each_steps_fraction_of_the_way_to_the_closed_form_optimum() -> None:
    """A shift alpha_t of the way at step t (a LoRA that is short at some steps, too far at others) is fitted the factor
    1 / alpha_t; the kernel at the fitted factors reads ratio 1 at every step."""
    world = GaussianWorld.default(dim=3, num_inference_steps=8, seed=0)
    beta = 0.2
    fractions = [0.3, 0.5, 0.8, 1.0, 1.5, 2.5, 4.0, 0.0]  # the last (DDPM's deterministic step) is not gauged
    steps, _, gains, errors, kls = pooled_steps(gauge_of_shifted_kernel(world, fractions, beta, beta))
    assert steps == list(range(7))
    factors = rescaled_factors([1.0] * 7, gains, errors, kls, beta, largest=10.0)
    for step, factor in zip(steps, factors):
        assert factor == pytest.approx(1 / fractions[step], rel=1e-9)
    fitted = [fraction * factor for fraction, factor in zip(fractions, factors)] + [0.0]
    report = gauge_of_shifted_kernel(world, fitted, beta, beta)
    assert report["max_ratio_deviation"] == pytest.approx(0.0, abs=1e-9)
    assert report["max_scale_deviation"] == pytest.approx(0.0, abs=1e-9)


def test_factors_are_zero_against_the_gradient_capped_and_kept_where_unresolved_or_nothing_moved() -> None:
    factors = rescaled_factors(current=[1.0, 1.0, 0.5, 0.0, 0.7, 1.0], gains=[2.0, -1.0, 1.0, 1.0, 0.0, 0.1],
                               gain_errors=[0.1, 0.1, 0.1, 0.1, 0.0, 2.0], kls=[1.0, 1.0, 1.0, 1.0, 0.0, 1.0],
                               beta=0.5, largest=1.5)
    # 2 / (2 * 0.5 * 1) = 2 capped; against the gradient; 0.5 * 1; off stays off; nothing moved; c = 0.1 ± 2 unresolved
    assert factors == [1.5, 0.0, 0.5, 0.0, 0.7, 1.0]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return random_world_adapter(tmp_path_factory.mktemp("adapters") / "a", 1, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def pipeline(adapter) -> MSDDAPipeline:
    pipe = MSDDAPipeline.from_pretrained("world", adapters=[str(adapter)])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(pipeline):
    pipeline.scheduler.set_timesteps(STEPS)  # timesteps 751, 501, 251, 1
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    positive, negative = pipeline.encode_prompt([PROMPT] * 2, "cpu", 1, True)
    return latents, positive, negative


def test_a_factor_is_peft_scaling_of_the_lora_and_zero_is_the_reference(pipeline) -> None:
    unet, name = pipeline.unet, pipeline.adapters[0].name
    latents, positive, negative = _inputs(pipeline)
    timestep = torch.tensor(501)
    register_step_scales(unet, name, [{"step": 0, "timestep": 501.0, "scale": 0.4},
                                      {"step": 1, "timestep": 1.0, "scale": 0.0}])
    try:
        with torch.no_grad():
            scaled, reference = adapter_kernels(unet, pipeline.scheduler, latents, timestep, positive, negative,
                                                [name, BASE], 3.0, 1.0)
            gated, reference_late = adapter_kernels(unet, pipeline.scheduler, latents, torch.tensor(1), positive,
                                                    negative, [name, BASE], 3.0, 1.0)
    finally:
        register_step_scales(unet, name, None)
    pipeline.set_adapters([name], [0.4])  # PEFT's own LoRA scaling, through the denoiser as configured
    try:
        with torch.no_grad():
            stock = guided_output(unet, latents, timestep, positive, negative, 3.0)
    finally:
        pipeline.set_adapters([name], [1.0])
    expected = sampler_kernel(pipeline.scheduler, stock, timestep, latents, 1.0)
    # the routed forward batches the reference's branch with the adapter's: float32 sums in another order (1.6e-6 apart
    # on one machine), while the factor's own effect is above 1e-4 (below)
    torch.testing.assert_close(scaled.mean, expected.mean, rtol=1e-4, atol=1e-5)
    assert torch.equal(gated.mean, reference_late.mean)
    assert not torch.allclose(scaled.mean, reference.mean, atol=1e-4)  # the factor 0.4 still moves it
    scaling = [module.scaling[name] for module in unet.modules() if hasattr(module, "scaling") and name in
               getattr(module, "scaling", {})]
    assert scaling and all(value == 1.0 for value in scaling)  # the LoRA's own scaling is back


def test_scales_in_the_metadata_are_applied_by_every_sampler_and_zero_everywhere_samples_the_base(
        adapter, pipeline, tmp_path) -> None:
    gated = tmp_path / "gated"
    gated.mkdir()
    for file in adapter.iterdir():
        (gated / file.name).write_bytes(file.read_bytes())
    metadata = json.loads((gated / METADATA_FILE).read_text())
    pipeline.scheduler.set_timesteps(STEPS)
    metadata["step_scales"] = [{"step": step, "timestep": float(t), "scale": 0.0}
                               for step, t in enumerate(pipeline.scheduler.timesteps)]
    (gated / METADATA_FILE).write_text(json.dumps(metadata))
    pipe = MSDDAPipeline.from_pretrained("world", adapters=[str(gated)])
    pipe.set_progress_bar_config(disable=True)

    def images(pipe, **kwargs):
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images

    base = images(pipeline, weights=[1.0], method="base")
    assert torch.equal(images(pipe, weights=[1.0], method="single"), base)
    assert torch.equal(images(pipe, weights=[1.0]), base)
    assert not torch.equal(images(pipeline, weights=[1.0], method="single"), base)


def test_refusals(pipeline) -> None:
    unet, name = pipeline.unet, pipeline.adapters[0].name
    with pytest.raises(UserError, match="finite number >= 0"):
        register_step_scales(unet, name, [{"step": 0, "timestep": 501.0, "scale": -1.0}])
    register_step_scales(unet, name, [{"step": 0, "timestep": 501.0, "scale": 0.5}])
    try:
        with pytest.raises(UserError, match="not for 251"), scaled_adapters(unet, torch.tensor(251)):
            pass
        with pytest.raises(UserError, match="one timestep per forward"), scaled_adapters(unet, torch.tensor([501, 1])):
            pass
    finally:
        register_step_scales(unet, name, None)


def test_calibrate_writes_the_adapter_with_its_scales_beside_the_same_weights(tmp_path, capsys) -> None:
    """``msdda calibrate`` on a shipped adapter: the LoRA's bytes unchanged, a factor per step (near 0 at the last
    two, where the step's optimum hardly moves), the beta and the gauge at the factors recorded, and the copy sampled at its factors."""
    from msdda.adapters import WEIGHTS_FILE, load_adapter_metadata, resolve_adapter
    from msdda.cli import main

    out = tmp_path / "calibrated"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["calibrate", "world:aesthetic", "--out", str(out), "--num-prompts", "2", "--draws", "2",
                     "--rounds", "1", "--beta", "0.004"]) == 0
    # fusion's advice to calibrate the adapter is not given while calibrating it
    assert not [w for w in caught if "far from their step optimum" in str(w.message)]
    assert f"calibrated adapter written to {out}" in capsys.readouterr().out
    source = resolve_adapter("world:aesthetic")
    assert (out / WEIGHTS_FILE).read_bytes() == (source / WEIGHTS_FILE).read_bytes()
    metadata = load_adapter_metadata(out)
    assert metadata.beta == 0.004 and metadata.training["calibrated"]["trained_beta"] == 0.001
    assert metadata.optimality["beta"] == 0.004
    assert [entry["step"] for entry in metadata.step_scales] == list(range(10))
    scales = [entry["scale"] for entry in metadata.step_scales]
    assert all(scale >= 0 for scale in scales) and max(scales) > 0.5
    assert max(scales[8:]) < 0.2  # t = 101 and t = 1: the optimum hardly moves there, and the LoRA moves far
    pipe = MSDDAPipeline.from_pretrained("world", adapters=[str(out)])
    assert list(registered_step_scales(pipe.unet).values()) == [metadata.step_scales]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--rounds", "0"], "rounds must be at least 1, got 0"),
    (["--beta", "-1"], "beta must be a number > 0, got -1.0"),
    (["--draws", "1"], "draws must be at least 2, got 1"),
])
def test_calibrate_refuses_bad_settings_before_loading(tmp_path, capsys, arguments: list[str], message: str) -> None:
    from msdda.cli import main

    assert main(["calibrate", "world:aesthetic", "--out", str(tmp_path / "out"), *arguments]) == 2
    assert message in capsys.readouterr().err
