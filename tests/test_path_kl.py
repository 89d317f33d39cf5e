"""Path KL accounting of the fused sampler on the embedded world with random adapters: the recorded KLs against an
independent computation with diffusers' own DDIMScheduler, and images unchanged by measuring them."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from msdda.diffusion import BASE
from msdda.errors import UserError
from msdda.fuse import MSDDAPipeline
from msdda.testing import random_world_adapter

STEPS = 3
PROMPTS = ["a red circle on the left", "a blue square at the top"]
ORACLE = "oracle_0"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("path_kl_adapters")
    return [random_world_adapter(root / name, seed, num_inference_steps=STEPS) for name, seed in
            (("a", 1), ("b", 2), ("oracle", 3))]


@pytest.fixture(scope="module")
def plain(adapters) -> MSDDAPipeline:
    """The reward adapters alone, as every pipeline was before KL accounting."""
    pipe = MSDDAPipeline.from_pretrained("world", adapters=[str(a) for a in adapters[:2]])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def measured(adapters) -> MSDDAPipeline:
    """The same, plus a comparison adapter (an oracle) to measure KLs against."""
    pipe = MSDDAPipeline.from_pretrained("world", adapters=[str(a) for a in adapters[:2]])
    pipe.load_comparison_adapters({ORACLE: str(adapters[2])})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe: MSDDAPipeline, method: str, weights: list[float], **kwargs):
    return pipe(PROMPTS, weights=weights, method=method, generator=torch.Generator().manual_seed(7),
                output_type="pt", **kwargs)


@contextmanager
def _unet_as(pipe: MSDDAPipeline, adapters: list[str], weights: list[float] | None):
    """The UNet with only ``adapters`` active at ``weights`` (none: the LoRAs disabled), by diffusers' own calls."""
    if adapters:
        pipe.set_adapters(adapters, weights)
    else:
        pipe.disable_lora()
    try:
        yield pipe.unet
    finally:
        pipe.enable_lora()
        pipe.set_adapters(["adapter_0", "adapter_1"], [1.0, 1.0])


def _by_hand(pipe: MSDDAPipeline, method: str, weights: list[float]) -> tuple[dict[str, torch.Tensor],
                                                                                list[torch.Tensor]]:
    """msdda's or soup's path KLs to the base and to the oracle, and the base's x0 estimate (``scheduler.step``'s
    ``pred_original_sample``) at every state, stepped with a stock DDIMScheduler: each kernel's
    mean is ``scheduler.step`` with zero noise, its variance eta^2 * ``scheduler._get_variance``; with equal betas
    and weights on the simplex msdda's mean is the weighted mean of the adapters' means (equal variances); the KL
    of two kernels of one variance is ||mu_p - mu_q||^2 / (2 var)."""
    guidance, eta = 3.0, 1.0  # random_world_adapter's metadata
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    generator = torch.Generator().manual_seed(7)
    shape = (len(PROMPTS), 4, 16, 16)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    totals = {BASE: torch.zeros(len(PROMPTS), dtype=torch.float64),
              ORACLE: torch.zeros(len(PROMPTS), dtype=torch.float64)}

    reference_x0 = []

    def step(adapters: list[str], adapter_weights: list[float] | None, t: torch.Tensor):
        with torch.no_grad(), _unet_as(pipe, adapters, adapter_weights) as unet:
            unconditional, conditional = unet(torch.cat([x, x]), t, torch.cat([negative, positive])).sample.chunk(2)
        epsilon = unconditional + guidance * (conditional - unconditional)
        return scheduler.step(epsilon, t, x, eta=eta, variance_noise=torch.zeros_like(x))

    def mean(adapters: list[str], adapter_weights: list[float] | None, t: torch.Tensor) -> torch.Tensor:
        return step(adapters, adapter_weights, t).prev_sample

    for t in scheduler.timesteps:
        variance = eta**2 * scheduler._get_variance(t, t - scheduler.config.num_train_timesteps // STEPS)
        if method == "msdda":
            own = sum(w * mean([name], None, t) for w, name in zip(weights, ["adapter_0", "adapter_1"]))
        else:
            own = mean(["adapter_0", "adapter_1"], weights, t)
        base = step([], None, t)
        reference_x0.append(base.pred_original_sample)
        if variance > 0:
            for target, kernel_mean in ((BASE, base.prev_sample), (ORACLE, mean([ORACLE], None, t))):
                totals[target] += ((own - kernel_mean) ** 2).sum(dim=(1, 2, 3)).double() / (2 * float(variance))
        x = own + float(variance) ** 0.5 * torch.randn(shape, generator=generator)
    return totals, reference_x0


@pytest.mark.parametrize("method", ["msdda", "soup"])
def test_recorded_path_kl_equals_an_independent_computation(measured, method: str) -> None:
    weights = [0.3, 0.7]
    recorded = _call(measured, method, weights, return_kl=True, kl_to=[ORACLE], return_reference_x0=True).path_kl
    expected, reference_x0 = _by_hand(measured, method, weights)
    for target in (BASE, ORACLE):
        assert bool((expected[target] > 1.0).all())  # the adapters really move the kernels
        torch.testing.assert_close(recorded.totals[target], expected[target], rtol=1e-4, atol=0)
    # the step-level objective's clean images: the base's x0 estimate at each state of the method's own path
    assert len(recorded.reference_x0) == STEPS
    for ours, theirs in zip(recorded.reference_x0, reference_x0):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["msdda", "diffusion-blend", "soup"])
def test_measuring_kls_changes_no_image(plain, measured, method: str) -> None:
    """Bit for bit: the measurement runs its own forwards and draws nothing, and comparison adapters fuse into
    nothing."""
    before = _call(plain, method, [0.4, 0.6]).images
    output = _call(measured, method, [0.4, 0.6], return_kl=True, kl_to=[ORACLE])
    assert torch.equal(output.images, before)
    assert bool((output.kl_to_base > 0).all()) and output.path_kl.unet_rows > 0


@pytest.mark.parametrize("method", ["msdda", "soup"])
def test_a_deferred_measurement_gives_the_same_images_first_and_the_same_kls_on_completion(measured,
                                                                                         method: str) -> None:
    now = _call(measured, method, [0.4, 0.6], return_kl=True, kl_to=[ORACLE])
    forwards = []
    hook = measured.unet.register_forward_hook(lambda module, args, output: forwards.append(len(args[0])))
    try:
        later = _call(measured, method, [0.4, 0.6], return_kl=True, kl_to=[ORACLE], defer_kl=True)
        sampled = len(forwards)
        assert torch.equal(later.images, now.images) and later.path_kl.waiting_steps == STEPS
        with pytest.raises(UserError, match="deferred .* call path_kl.complete"):
            later.kl_to_base
        later.path_kl.complete()
    finally:
        hook.remove()
    assert sampled == STEPS and len(forwards) > sampled  # the measuring forwards ran only on completion
    assert later.path_kl.waiting_steps == 0 and later.path_kl.unet_rows == now.path_kl.unet_rows
    for target in (BASE, ORACLE):
        assert torch.equal(later.path_kl.totals[target], now.path_kl.totals[target])


def test_kernels_the_method_computed_are_reused(measured) -> None:
    """The base's kernel is its own: KL exactly 0, no forward. MSDDA with the reference entering (beta != the
    adapters' beta) evaluates the base in its own forward, and that kernel is reused."""
    base = _call(measured, "base", [0.5, 0.5], return_kl=True).path_kl
    assert bool((base.totals[BASE] == 0).all()) and base.unet_rows == 0
    fused = _call(measured, "msdda", [0.5, 0.5], beta=0.02, return_kl=True).path_kl
    assert fused.unet_rows == 0 and bool((fused.totals[BASE] > 0).all())


def test_bad_kl_requests_are_refused(measured) -> None:
    with pytest.raises(UserError, match="pass return_kl=True"):
        _call(measured, "msdda", [0.5, 0.5], kl_to=[ORACLE])
    with pytest.raises(UserError, match="return_reference_x0=True is measured along with the path KL"):
        _call(measured, "msdda", [0.5, 0.5], return_reference_x0=True)
    with pytest.raises(UserError, match="defer_kl=True is measured along with the path KL"):
        _call(measured, "msdda", [0.5, 0.5], defer_kl=True)
    with pytest.raises(UserError, match="cannot wait for defer_kl=True"):
        _call(measured, "msdda", [0.5, 0.5], return_kl=True, return_reference_x0=True, defer_kl=True)
    with pytest.raises(UserError, match=r"kl_to names \['oracle_9'\].*load_comparison_adapters"):
        _call(measured, "msdda", [0.5, 0.5], return_kl=True, kl_to=["oracle_9"])
    with pytest.raises(UserError, match="are taken"):
        measured.load_comparison_adapters({"adapter_0": "unused"})
