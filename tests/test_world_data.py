"""The embedded world's procedural data, grammar and tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from msdda.world.data import (
    HELD_OUT,
    Attributes,
    PromptError,
    all_combinations,
    parse_prompt,
    procedural_dataset,
    prompt_for,
    render_images,
    sample_attributes,
    training_combinations,
)
from msdda.world.models import build_tokenizer


def test_rendering_is_deterministic_from_the_seed() -> None:
    attributes = sample_attributes(32, seed=3)
    assert sample_attributes(32, seed=3) == attributes
    np.testing.assert_array_equal(render_images(attributes, 5), render_images(attributes, 5))
    assert not np.array_equal(render_images(attributes, 5), render_images(attributes, 6))


def test_dataset_has_prompts_and_labels_and_no_held_out_combination() -> None:
    dataset = procedural_dataset(64, seed=1)
    assert dataset.column_names == ["image", "prompt", "colour", "shape", "position"]
    assert dataset[0]["image"].size == (32, 32)
    names = dataset.features
    held_out = {Attributes(*combo) for combo in HELD_OUT}
    for row in dataset:
        attributes = Attributes(names["colour"].int2str(row["colour"]), names["shape"].int2str(row["shape"]),
                                names["position"].int2str(row["position"]))
        assert attributes not in held_out
        assert parse_prompt(row["prompt"]) == attributes
    assert len(training_combinations()) == len(all_combinations()) - len(HELD_OUT)
    assert set(sample_attributes(200, seed=0, split="held_out")) == held_out


def test_colour_sits_where_the_prompt_says() -> None:
    """The shape's pixels (far from the background) lie on the side the position names."""
    for position, axis, sign in (("left", 1, -1), ("right", 1, 1), ("top", 0, -1), ("bottom", 0, 1)):
        image = render_images([Attributes("red", "square", position)], seed=0)[0].astype(float)
        redness = image[..., 0] - image[..., 1:].mean(-1)
        ys, xs = np.nonzero(redness > 100)
        centroid = (ys.mean(), xs.mean())[axis]
        assert sign * (centroid - 16) > 4


@pytest.mark.parametrize("prompt", ["a red circle on the left", "A Blue Triangle at the bottom.",
                                    "green square in the centre"])
def test_parse_prompt_reads_the_grammar(prompt: str) -> None:
    attributes = parse_prompt(prompt)
    assert parse_prompt(prompt_for(attributes)) == attributes


@pytest.mark.parametrize("prompt", ["", "a zebra", "a pink circle on the left", "a red hexagon at the top",
                                    "a red circle somewhere"])
def test_parse_prompt_names_the_grammar_on_bad_prompts(prompt: str) -> None:
    with pytest.raises(PromptError, match="a <colour> <shape> <position>"):
        parse_prompt(prompt)


def test_tokenizer_gives_one_token_per_word_and_falls_back_to_characters() -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.tokenize("a purple triangle at the bottom") == [
        "a</w>", "purple</w>", "triangle</w>", "at</w>", "the</w>", "bottom</w>"]
    assert len(tokenizer.tokenize("zebra")) > 1  # unknown words become characters, never an error
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == tokenizer.model_max_length
