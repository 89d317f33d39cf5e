"""CLIP-family rewards on transformers: CLIP score, PickScore, HPSv2 and the LAION aesthetic predictor.

All four embed the image with a CLIP vision tower. The preference scores are a scale times the cosine between
image and prompt embeddings (they differ in weights and scale); the aesthetic predictor puts an MLP head on
the normalised image embedding. Images are preprocessed in torch exactly as the model's CLIPImageProcessor
does it (shortest side resized bicubic, centre crop, normalise), so the scores are differentiable in the
pixels. Weights come from a Hub id or a local folder, safetensors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from msdda.errors import InputNotFound, UserError
from msdda.rewards.base import Reward, register_reward

__all__ = ["CLIPPreference", "LaionAesthetic", "ClipImagePreprocess", "AestheticHead", "load_pretrained",
           "resolve_weights_file"]


def load_pretrained(cls, source: str, what: str, **kwargs):
    """``cls.from_pretrained(source, **kwargs)``, or one error naming what to fetch and where to put it."""
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise InputNotFound(
            f"cannot load the {what} from {source!r} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"Download it once where the Hub is reachable (huggingface-cli download {source} --local-dir "
            f"<folder>), copy the folder here and pass the folder as the reward's model path; safetensors weights "
            "are required") from error


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImagePreprocess(nn.Module):
    """CLIP's resize (shortest side, bicubic), centre crop and normalisation as differentiable torch ops on
    [0, 1] images."""

    def __init__(self, shortest_edge: int, crop: tuple[int, int], mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> None:
        super().__init__()
        self.shortest_edge, self.crop = shortest_edge, crop
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_processor(cls, processor) -> ClipImagePreprocess:
        """The same steps with a CLIPImageProcessor's settings."""
        size, crop = processor.size, processor.crop_size
        shortest = size["shortest_edge"] if "shortest_edge" in size else min(size["height"], size["width"])
        return cls(shortest, (crop["height"], crop["width"]), processor.image_mean, processor.image_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        scale = self.shortest_edge / min(height, width)
        # int(), not round(): the size transformers resizes to
        size = (max(self.shortest_edge, int(height * scale)), max(self.shortest_edge, int(width * scale)))
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        images = images[..., top:top + self.crop[0], left:left + self.crop[1]].clamp(0, 1)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


def clip_image_processor_class() -> type:
    """The CLIP image processor that needs no torchvision: ``CLIPImageProcessorPil`` in transformers 5 (where
    plain ``CLIPImageProcessor`` is the torchvision backend, and falls back to the PIL one with a warning when
    torchvision is missing), ``CLIPImageProcessor`` in transformers 4 (which is the PIL one there). Only its
    settings are read (:meth:`ClipImagePreprocess.from_processor`), which both backends share."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _pooled(output) -> torch.Tensor:
    """Projected embeddings from get_*_features (a tensor in transformers 4, an output object in 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


class CLIPPreference(Reward):
    """``scale * cos(image embedding, prompt embedding)`` under a CLIPModel."""

    differentiable = True

    def __init__(self, model: str, processor: str | None = None, scale: float | None = None,
                 name: str = "clip-preference", version: str = "1") -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.name, self.version = name, version
        self.model = load_pretrained(CLIPModel, model, f"{name} model", use_safetensors=True)
        self.model.eval().requires_grad_(False)
        processor = processor or model
        self.tokenizer = load_pretrained(AutoTokenizer, processor, f"{name} tokenizer")
        self.preprocess = ClipImagePreprocess.from_processor(
            load_pretrained(clip_image_processor_class(), processor, f"{name} processor"))
        self.scale = float(self.model.logit_scale.exp()) if scale is None else float(scale)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        tokens = {key: value.to(images.device) for key, value in tokens.items()}
        pixels = self.preprocess(images).to(self.model.dtype)
        image_embeds = F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        text_embeds = F.normalize(_pooled(self.model.get_text_features(**tokens)).float(), dim=-1)
        return self.scale * (image_embeds * text_embeds).sum(dim=-1)


@register_reward("clip-score")
def clip_score(model: str = "openai/clip-vit-large-patch14", processor: str | None = None) -> CLIPPreference:
    """100 x cosine of CLIP ViT-L/14 image and prompt embeddings (torchmetrics' CLIPScore without its clamp at 0,
    which would zero the gradient)."""
    return CLIPPreference(model, processor, scale=100.0, name="clip-score")


@register_reward("pickscore")
def pickscore(model: str = "yuvalkirstain/PickScore_v1",
              processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K") -> CLIPPreference:
    """PickScore (Kirstain et al. 2023): the model's logit scale times the cosine, as its reference code scores."""
    return CLIPPreference(model, processor, scale=None, name="pickscore")


@register_reward("hpsv2")
def hpsv2(model: str | None = None, processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K") -> CLIPPreference:
    """HPSv2 (Wu et al. 2023): the cosine under the HPSv2-tuned ViT-H/14. Its official weights are an open_clip
    pickle, which msdda does not load: ``model`` is a folder holding them converted to transformers' CLIPModel
    layout in safetensors."""
    if model is None:
        raise UserError("hpsv2 needs model=<folder>: the HPSv2 weights (xswu/HPSv2 on the Hub, an open_clip "
                         "pickle) converted once to a transformers CLIPModel folder with safetensors weights")
    return CLIPPreference(model, processor, scale=1.0, name="hpsv2")


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (LAION): 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


@register_reward("laion-aesthetic")
class LaionAesthetic(Reward):
    """The LAION aesthetic predictor v2: the MLP head on the L2-normalised CLIP ViT-L/14 image embedding (the
    score DDPO and AlignProp fine-tune for). ``head`` is a safetensors file of the head's state dict (keys
    ``layers.0.weight`` ...), local or ``repo_id:filename`` on the Hub."""

    name = "laion-aesthetic"
    version = "2"
    differentiable = True

    def __init__(self, head: str, model: str = "openai/clip-vit-large-patch14", processor: str | None = None) -> None:
        super().__init__()
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        self.vision = load_pretrained(CLIPVisionModelWithProjection, model, "aesthetic CLIP vision model",
                                      use_safetensors=True)
        self.vision.eval().requires_grad_(False)
        self.preprocess = ClipImagePreprocess.from_processor(
            load_pretrained(clip_image_processor_class(), processor or model, "aesthetic CLIP processor"))
        self.head = AestheticHead(self.vision.config.projection_dim)
        self.head.load_state_dict(load_file(resolve_weights_file(head, "aesthetic head")))
        self.head.eval().requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.vision.dtype)
        embeddings = F.normalize(self.vision(pixel_values=pixels).image_embeds.float(), dim=-1)
        return self.head(embeddings).squeeze(-1)


def resolve_weights_file(source: str, what: str) -> str:
    """A local file, or ``repo_id:filename`` fetched with huggingface_hub; safetensors only."""
    if Path(source).is_file():
        path = source
    elif ":" in source:
        from huggingface_hub import hf_hub_download

        repo_id, _, filename = source.partition(":")
        try:
            path = hf_hub_download(repo_id, filename)
        except Exception as error:  # huggingface_hub raises many types for offline / missing files
            raise InputNotFound(
                f"cannot fetch the {what} {source!r} ({type(error).__name__}); download {filename} from "
                f"https://huggingface.co/{repo_id} where the Hub is reachable and pass the local file") from error
    else:
        raise InputNotFound(f"the {what} {source!r} is neither a file nor 'repo_id:filename'")
    if not str(path).endswith(".safetensors"):
        raise UserError(f"the {what} {path} is not a .safetensors file; msdda never unpickles weights: convert it "
                         "to safetensors first")
    return str(path)
