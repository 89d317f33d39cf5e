"""The fusion-method registry: what each built-in method declares, and a new method added as one class."""

from __future__ import annotations

import pytest
import torch

from msdda.errors import UserError
from msdda.fuse import MSDDAPipeline
from msdda.fuse.config import BUILTIN_METHODS
from msdda.fuse.methods import FusionMethod, get_method, method_names, register, unregister
from msdda.kernels import StepKernel
from msdda.testing import random_world_adapter

PROMPT = "a blue square at the top"


def test_the_built_in_methods_in_their_listing_order_with_what_they_need() -> None:
    assert method_names() == ["msdda", "soup", "output-average", "diffusion-blend", "code", "rgg", "single", "base"]
    assert tuple(method_names()) == BUILTIN_METHODS  # what msdda fuse --help lists without importing the registry
    assert [m for m in method_names() if get_method(m).uses_betas] == ["msdda"]
    assert [m for m in method_names() if get_method(m).needs_rewards] == ["code", "rgg"]
    assert [m for m in method_names() if get_method(m).needs_reward_gradients] == ["rgg"]
    assert [m for m in method_names() if not get_method(m).gaussian] == ["code"]
    assert [m for m in method_names() if not get_method(m).sweeps_weights] == ["single", "base"]
    assert [m for m in method_names() if not get_method(m).needs_adapters] == ["base"]
    assert get_method("output-average").coincides_with == "msdda"
    grid = [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    assert get_method("msdda").cell_weights(grid, 2) == grid
    assert get_method("single").cell_weights(grid, 2) == [(1.0, 0.0), (0.0, 1.0)]
    assert get_method("base").cell_weights(grid, 2) == [(0.5, 0.5)]


def test_an_unknown_method_is_refused_with_the_known_ones() -> None:
    with pytest.raises(UserError, match=r"method must be one of \['msdda', 'soup'.*got 'average'"):
        get_method("average")
    with pytest.raises(UserError, match="no fusion method named 'average'"):
        unregister("average")


def test_only_msdda_weights_the_adapters_by_their_betas() -> None:
    assert get_method("msdda").exponents([0.5, 0.5], [0.1, 0.3], 0.2) == pytest.approx([0.25, 0.75])
    assert get_method("soup").exponents([0.5, 0.5], [0.1, 0.3], 0.2) == [0.5, 0.5]
    with pytest.raises(UserError, match="weights must be >= 0"):
        get_method("soup").exponents([-1.0, 2.0], [0.1, 0.1], None)


@pytest.fixture
def pipeline(tmp_path):
    adapters = [random_world_adapter(tmp_path / name, seed, num_inference_steps=3) for name, seed in
                (("a", 1), ("b", 2))]
    pipe = MSDDAPipeline.from_pretrained("world", adapters=[str(a) for a in adapters])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_new_method_is_one_registered_class(pipeline) -> None:
    """A geometric-mean-of-means method, defined here alone, samples through the pipeline like the built-ins; with
    equal variances and weights on the simplex it is MSDDA, so the two give the same images."""

    @register
    class MeanOfMeans(FusionMethod):
        name = "mean-of-means"
        label = "mean of means"

        def kernel(self, context, index, timestep, latents) -> StepKernel:
            kernels = context.kernels(latents, timestep, context.adapter_names)
            mean = sum(w * k.mean for w, k in zip(context.weights, kernels))
            return StepKernel(mean=mean, variance=kernels[0].variance)

    try:
        assert "mean-of-means" in method_names()
        with pytest.raises(UserError, match="registered already"):
            register(MeanOfMeans)
        images = {method: pipeline(PROMPT, weights=[0.3, 0.7], method=method, output_type="pt",
                                   generator=torch.Generator().manual_seed(4)).images
                  for method in ("mean-of-means", "msdda")}
        torch.testing.assert_close(images["mean-of-means"], images["msdda"], rtol=0, atol=1e-5)
    finally:
        unregister("mean-of-means")
    assert "mean-of-means" not in method_names()
