"""CLIP-family and JPEG rewards on tiny randomly initialised models built offline from configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from msdda.rewards import load_reward
from msdda.rewards.clip import AestheticHead, ClipImagePreprocess
from msdda.testing import tiny_blip, tiny_clip

PROMPTS = ["a red circle on the left", "a blue square at the top", "a photo of a cat"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def _images(count: int, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images on the 1/255 grid (what a uint8 PIL image holds)."""
    coarse = torch.rand(count, 3, 6, 8, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=(height, width), mode="bilinear") * 255).round() / 255


def _pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in images]


def test_preprocessing_matches_the_model_processor(clip_folder: Path) -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(clip_folder)
    ours = ClipImagePreprocess.from_processor(processor)
    square = _images(2, 32, 32)  # no resize: identical up to float rounding
    reference = torch.as_tensor(np.asarray(processor(images=_pil(square), return_tensors="np").pixel_values))
    torch.testing.assert_close(ours(square), reference, atol=1e-5, rtol=0)
    wide = _images(2, 48, 64)  # resize (PIL bicubic on uint8 vs torch antialiased bicubic) and centre crop
    reference = torch.as_tensor(np.asarray(processor(images=_pil(wide), return_tensors="np").pixel_values))
    difference = (ours(wide) - reference).abs()
    assert float(difference.mean()) < 0.02 and float(difference.max()) < 0.1


@pytest.mark.parametrize("name", ["clip-score", "pickscore"])
def test_clip_preferences_are_scaled_cosines_batched_and_deterministic(clip_folder: Path, name: str) -> None:
    from transformers import CLIPModel, CLIPProcessor

    reward = load_reward(name, model=str(clip_folder), processor=str(clip_folder))
    images = _images(3)
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(reward(images, PROMPTS), scores)
    singles = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, scores, rtol=1e-4, atol=1e-4)
    # independently: the stock processor and model, cosine times the scale the reward declares
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    inputs = processor(text=PROMPTS, images=_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model(**inputs)
    cosine = F.cosine_similarity(outputs.image_embeds, outputs.text_embeds)
    scale = 100.0 if name == "clip-score" else float(model.logit_scale.detach().exp())
    torch.testing.assert_close(scores, scale * cosine, atol=0.05 * scale, rtol=0)
    assert reward.differentiable
    pixels = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(reward(pixels, PROMPTS, grad=True).sum(), pixels)
    assert gradient.abs().sum() > 0


def test_laion_aesthetic_is_its_head_on_the_normalised_embedding(clip_folder: Path, tmp_path: Path) -> None:
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(3)
    head = AestheticHead(dim=16)
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    reward = load_reward("laion-aesthetic", head=str(tmp_path / "head.safetensors"), model=str(clip_folder))
    images = _images(3)
    scores = reward(images, PROMPTS)
    vision = CLIPVisionModelWithProjection.from_pretrained(clip_folder)
    with torch.no_grad():
        embeddings = vision(pixel_values=reward.preprocess(images)).image_embeds
        expected = head.eval()(F.normalize(embeddings, dim=-1)).squeeze(-1)
    torch.testing.assert_close(scores, expected)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    with pytest.raises(ValueError, match="never unpickles"):
        load_reward("laion-aesthetic", head=str(tmp_path / "head.pth"), model=str(clip_folder))


def test_missing_reward_weights_name_what_to_download(offline, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="huggingface-cli download openai/clip-vit-large-patch14"):
        load_reward("clip-score")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_reward("clip-score", model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="hpsv2 needs model="):
        load_reward("hpsv2")


def test_jpeg_rewards_rank_flat_images_as_more_compressible() -> None:
    flat = torch.full((2, 3, 64, 64), 0.5)
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    compressibility = load_reward("jpeg-compressibility")
    assert (compressibility(flat, ["x"] * 2) > compressibility(noise, ["x"] * 2)).all()
    torch.testing.assert_close(load_reward("jpeg-incompressibility")(noise, ["x"] * 2),
                               -compressibility(noise, ["x"] * 2))
    with pytest.raises(ValueError, match="not differentiable"):
        compressibility(flat, ["x"] * 2, grad=True)


def test_imagereward_is_the_standardised_head_on_the_image_grounded_cls(tmp_path: Path) -> None:
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    from msdda.rewards.imagereward import MAX_PROMPT_TOKENS, SCORE_MEAN, SCORE_STD

    folder = tiny_blip(tmp_path / "blip")
    torch.manual_seed(2)
    head = AestheticHead(dim=32)
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    reward = load_reward("imagereward", model=str(folder), head=str(tmp_path / "head.safetensors"))
    images = _images(3)
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,)
    singles = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, scores, rtol=1e-4, atol=1e-4)
    # independently: the stock ITM forward's image-grounded question embedding, [ENC] first as ImageReward does
    tokenizer, model = BertTokenizer.from_pretrained(folder), BlipForImageTextRetrieval.from_pretrained(folder)
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                       return_tensors="pt")
    tokens.input_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
    pixels = ClipImagePreprocess(32, (32, 32))(images)
    with torch.no_grad():
        grounded = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                         use_itm_head=True).question_embeds[:, 0]
        expected = (head.eval()(grounded).squeeze(-1) - SCORE_MEAN) / SCORE_STD
    torch.testing.assert_close(scores, expected)
    with pytest.raises(ValueError, match="imagereward needs model="):
        load_reward("imagereward")
