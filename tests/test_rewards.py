"""The reward interface and registry, and the embedded world's rewards against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from msdda.rewards import FunctionReward, Reward, available_rewards, load_reward
from msdda.rewards.world import (
    COLOUR_SCALE,
    PLACEMENT_SCALE,
    THIRDS_SCALE,
    centredness,
    colour_match,
    colourfulness,
    placement,
    shape_probabilities,
    thirds,
)
from msdda.world.data import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Attributes,
    PromptError,
    prompt_for,
    render_images,
    sample_attributes,
    shape_coverage,
)


def _procedural(count: int, seed: int = 0) -> tuple[torch.Tensor, list[Attributes]]:
    attributes = sample_attributes(count, seed, "all")
    images = torch.from_numpy(render_images(attributes, seed + 1)).permute(0, 3, 1, 2).float() / 255
    return images, attributes


def test_colourfulness_matches_hasler_suesstrunk_by_hand() -> None:
    image = torch.zeros(1, 3, 4, 4)
    image[0, 0, :, :2] = 1.0  # left half pure red
    image[0, 2, :, 2:] = 1.0  # right half pure blue
    # rg: 255 | 0 -> mean 127.5, std 127.5;  yb: 127.5 | -255 -> mean -63.75, std 191.25
    expected = (math.hypot(127.5, 191.25) + 0.3 * math.hypot(127.5, -63.75)) / 100
    assert float(colourfulness(image)) == pytest.approx(expected, rel=1e-6)
    assert float(colourfulness(torch.full((1, 3, 4, 4), 0.5))) == pytest.approx(0.0, abs=1e-6)


def test_centredness_is_one_minus_the_normalised_centroid_distance() -> None:
    image = torch.zeros(1, 3, 32, 32)
    image[0, :, 5, 20] = 1.0  # one white pixel on black: the centroid is that pixel's centre
    expected = 1 - math.hypot(5.5 - 16, 20.5 - 16) / (0.5 * math.hypot(32, 32))
    assert float(centredness(image)) == pytest.approx(expected, rel=1e-6)
    scores = centredness(torch.from_numpy(render_images(
        [Attributes("red", "circle", "center"), Attributes("red", "circle", "left")], 0)).permute(0, 3, 1, 2) / 255)
    assert float(scores[0]) > float(scores[1]) + 0.2


def test_thirds_is_one_minus_the_scaled_distance_to_the_nearest_thirds_point() -> None:
    image = torch.zeros(3, 3, 32, 32)
    image[0, :, 5, 20] = 1.0  # one white pixel on black: the centroid is that pixel's centre, (20.5, 5.5)
    image[1, :, 10, 21] = 1.0  # centroid (21.5, 10.5), 0.24 px from the thirds point (64/3, 32/3)
    nearest = [math.hypot(20.5 - 64 / 3, 5.5 - 32 / 3), math.hypot(21.5 - 64 / 3, 10.5 - 32 / 3)]
    expected = [1 - d / THIRDS_SCALE for d in nearest] + [0.0]  # the third image has no subject
    torch.testing.assert_close(thirds(image), torch.tensor(expected), rtol=1e-6, atol=1e-6)
    far = torch.zeros(1, 3, 32, 32)
    far[0, :, 0, 0] = 1.0  # 14.6 px from the nearest point: floored at 0
    assert float(thirds(far)) == 0.0
    # white discs on grey, centred on the image centre, a prompt's "on the left" and a thirds point
    centres = torch.tensor([[16.0, 16.0], list(POSITIONS["left"][1]), [32 / 3, 64 / 3]], dtype=torch.float64)
    discs = 0.3 + 0.7 * shape_coverage("circle", centres, torch.full((3,), 5.0, dtype=torch.float64))
    distances = [math.hypot(16 - 32 / 3, 16 - 32 / 3), math.hypot(8.5 - 32 / 3, 16 - 32 / 3), 0.0]
    scores = load_reward("world-thirds")(discs[:, None].expand(3, 3, 32, 32).float(), ["a red circle"] * 3)
    # a disc off the pixel grid has its pixelated centroid within 0.005 px of its centre
    torch.testing.assert_close(scores, torch.tensor([1 - d / THIRDS_SCALE for d in distances]), rtol=0, atol=5e-4)


@pytest.mark.parametrize("name", ["world-consistency", "world-consistency-measured", "world-aesthetic",
                                  "world-thirds"])
def test_world_rewards_are_deterministic_batched_and_one_float_per_image(name: str) -> None:
    reward = load_reward(name)
    images, attributes = _procedural(12)
    prompts = [prompt_for(a) for a in attributes]
    scores = reward(images, prompts)
    assert scores.shape == (12,) and scores.dtype == torch.float32 and bool(scores.isfinite().all())
    torch.testing.assert_close(reward(images, prompts), scores)
    singles = torch.cat([reward(images[i:i + 1], prompts[i:i + 1]) for i in range(12)])
    torch.testing.assert_close(singles, scores, rtol=1e-5, atol=1e-5)
    assert reward.name == name and reward.version


def test_consistency_reads_procedural_images_and_punishes_wrong_prompts() -> None:
    reward = load_reward("world-consistency")
    images, attributes = _procedural(200, seed=4)
    right = reward(images, [prompt_for(a) for a in attributes])
    colours = list(COLOURS)
    wrong_colour = [Attributes(colours[(colours.index(a.colour) + 1) % len(colours)], a.shape, a.position)
                    for a in attributes]
    wrong = reward(images, [prompt_for(a) for a in wrong_colour])
    assert 0.0 <= float(right.min()) and float(right.max()) <= 1.0
    assert float(right.mean()) > 0.95
    # a wrong colour loses that third of the score: about 1/3 below, and never above for a confident image
    assert float(right.mean()) > float(wrong.mean()) + 0.25


def test_measured_consistency_reads_procedural_images_and_punishes_each_wrong_attribute() -> None:
    reward = load_reward("world-consistency-measured")
    images, attributes = _procedural(200, seed=4)
    right = reward(images, [prompt_for(a) for a in attributes])
    assert 0.0 <= float(right.min()) and float(right.max()) <= 1.0
    assert float(right.mean()) > 0.85
    colours, shapes, positions = list(COLOURS), list(SHAPES), list(POSITIONS)
    for wrong in ([Attributes(colours[(colours.index(a.colour) + 1) % 6], a.shape, a.position) for a in attributes],
                  [Attributes(a.colour, shapes[(shapes.index(a.shape) + 1) % 3], a.position) for a in attributes],
                  [Attributes(a.colour, a.shape, "left" if a.position == "right" else "right") for a in attributes]):
        # each wrong attribute costs most of its third of the score
        assert float(right.mean()) > float(reward(images, [prompt_for(a) for a in wrong]).mean()) + 0.15


def test_measured_consistency_parts_match_closed_forms() -> None:
    image = torch.zeros(1, 3, 32, 32)
    image[0, :, 5, 20] = 1.0  # one white pixel on black: the centroid is that pixel's centre, (20.5, 5.5)
    top = torch.tensor([POSITIONS["top"][1]])
    expected = 1 - math.hypot(20.5 - top[0, 0], 5.5 - top[0, 1]) / PLACEMENT_SCALE
    assert float(placement(image, top)) == pytest.approx(expected, rel=1e-6)
    assert float(placement(image, torch.tensor([POSITIONS["left"][1]]))) == 0.0  # farther than the scale
    block = torch.zeros(1, 3, 32, 32)
    colour = torch.tensor([0.8, 0.2, 0.1])
    block[0, :, 10:18, 12:20] = colour[:, None, None]  # a flat subject: its mean colour is its colour
    red = torch.tensor([COLOURS["red"]]) / 255
    assert float(colour_match(block, red)) == pytest.approx(1 - float((colour - red[0]).norm()) / COLOUR_SCALE,
                                                            rel=1e-5)
    flat = torch.full((1, 3, 32, 32), 0.4)  # no subject: every part scores 0
    assert float(placement(flat, top)) == float(colour_match(flat, red)) == 0.0
    assert float(shape_probabilities(flat).abs().sum()) == 0.0


def test_shape_templates_read_every_drawn_shape() -> None:
    images, attributes = _procedural(300, seed=6)
    probabilities = shape_probabilities(images)
    truth = torch.tensor([SHAPES.index(a.shape) for a in attributes])
    assert bool((probabilities.argmax(dim=1) == truth).all())
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(300))
    assert float(probabilities.gather(1, truth[:, None]).mean()) > 0.9


@pytest.mark.parametrize("name", ["world-consistency", "world-consistency-measured"])
def test_consistency_refuses_prompts_outside_the_grammar(name: str) -> None:
    images, _ = _procedural(2)
    with pytest.raises(PromptError, match="grammar"):
        load_reward(name)(images, ["a zebra", "a red circle on the left"])


def test_registry_and_user_rewards() -> None:
    assert {"world-consistency", "world-aesthetic"} <= set(available_rewards())
    brightness = load_reward("tests.user_rewards:brightness")
    assert isinstance(brightness, FunctionReward)
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(brightness(images, ["x"] * 3), images.mean(dim=(1, 2, 3)))
    assert isinstance(load_reward("tests.user_rewards:Redness"), Reward)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        load_reward("nope")
    with pytest.raises(ValueError, match="cannot load reward"):
        load_reward("tests.user_rewards:missing")
    with pytest.raises(ValueError, match="got 3 images but 2 prompts"):
        brightness(images, ["x", "y"])


@pytest.mark.parametrize("name", ["world-aesthetic", "world-thirds"])
def test_rewards_give_grad_only_when_asked_and_able(name: str) -> None:
    pictures, attributes = _procedural(2, seed=3)
    # generated images have no exactly tied pixels (flat procedural ones do, where the border median has a kink)
    jitter = torch.rand(pictures.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    images = (pictures.clamp(0.05, 0.93) + jitter).requires_grad_(True)
    prompts = [prompt_for(a) for a in attributes]
    reward = load_reward(name)
    assert not reward(images, prompts).requires_grad  # no grad unless asked
    scores = reward(images, prompts, grad=True)
    (gradient,) = torch.autograd.grad(scores.sum(), images)
    assert float(gradient.abs().sum()) > 0
    # the pixel gradient matches a float64 central difference along a small random direction
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    base, step = images.detach().double(), 1e-4
    numeric = (reward.score(base + step * direction, prompts) - reward.score(base - step * direction, prompts)).sum()
    assert float((gradient.double() * direction).sum()) == pytest.approx(float(numeric) / (2 * step), rel=1e-3)
    with pytest.raises(ValueError, match="not differentiable"):
        load_reward("tests.user_rewards:brightness")(images, prompts, grad=True)


def test_measured_consistency_gradient_is_exact_but_for_the_fitted_shape_templates() -> None:
    pictures, attributes = _procedural(2, seed=3)
    jitter = torch.rand(pictures.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    images = (pictures.clamp(0.05, 0.93) + jitter).requires_grad_(True)
    prompts = [prompt_for(a) for a in attributes]
    colours = torch.tensor([COLOURS[a.colour] for a in attributes]) / 255
    positions = torch.tensor([POSITIONS[a.position][1] for a in attributes])

    def measured(x: torch.Tensor) -> torch.Tensor:  # colour and placement: exact gradients
        return colour_match(x, colours.to(x.dtype)) + placement(x, positions.to(x.dtype))

    (gradient,) = torch.autograd.grad(measured(images).sum(), images)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    base, step = images.detach().double(), 1e-4
    numeric = (measured(base + step * direction) - measured(base - step * direction)).sum() / (2 * step)
    assert float((gradient.double() * direction).sum()) == pytest.approx(float(numeric), rel=1e-3)
    reward = load_reward("world-consistency-measured")
    (total,) = torch.autograd.grad(reward(images, prompts, grad=True).sum(), images)
    (shape,) = torch.autograd.grad(shape_probabilities(images).gather(
        1, torch.tensor([[SHAPES.index(a.shape)] for a in attributes])).sum(), images)
    torch.testing.assert_close(total, (gradient + shape) / 3)


def test_weighted_sum_is_the_weighted_sum_of_its_parts() -> None:
    images, attributes = _procedural(6, seed=2)
    prompts = [prompt_for(a) for a in attributes]
    combined = load_reward("weighted-sum", rewards=["world-aesthetic", "world-consistency"], weights=[0.25, 0.75])
    expected = 0.25 * load_reward("world-aesthetic")(images, prompts) + 0.75 * load_reward("world-consistency")(
        images, prompts)
    torch.testing.assert_close(combined(images, prompts), expected)
    assert combined.differentiable and combined.name == "weighted-sum(0.25*world-aesthetic + 0.75*world-consistency)"
    with pytest.raises(ValueError, match="one weight per reward"):
        load_reward("weighted-sum", rewards=["world-aesthetic"], weights=[0.5, 0.5])
