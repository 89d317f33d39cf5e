"""ImageReward (Xu et al. 2023) re-implemented on transformers' BLIP.

ImageReward scores a prompt-image pair with BLIP's text encoder, which cross-attends to the ViT image tokens;
the [CLS] state goes through an MLP head, and the output is standardised with the mean and std the authors
measured. transformers' ``BlipForImageTextRetrieval`` holds the same vision tower and cross-attending text
encoder, so msdda loads ImageReward's weights in that layout (safetensors; the official ImageReward.pt is a
pickle and must be converted once) plus the head as a safetensors file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msdda.errors import UserError
from msdda.rewards.base import Reward, register_reward
from msdda.rewards.clip import (
    AestheticHead,
    ClipImagePreprocess,
    load_pretrained,
    resolve_weights_file,
)

__all__ = ["ImageReward"]

# ImageReward's standardisation constants (ImageReward/ImageReward.py)
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35


@register_reward("imagereward")
class ImageReward(Reward):
    """ImageReward's standardised preference score for (prompt, image); differentiable in the pixels.

    ``model``: a folder (or Hub id) with ImageReward's BLIP as a ``BlipForImageTextRetrieval`` in safetensors,
    with a BERT tokenizer; ``head``: the MLP head's state dict as safetensors (``layers.0.weight`` ...), local or
    ``repo_id:filename``. Images are resized on the shortest side (bicubic), centre-cropped to the vision
    tower's size and normalised with CLIP's mean and std, as ImageReward's own transform does.
    """

    name = "imagereward"
    version = "1.0"
    differentiable = True

    def __init__(self, model: str | None = None, head: str | None = None) -> None:
        super().__init__()
        if model is None or head is None:
            raise UserError("imagereward needs model=<folder> and head=<file.safetensors>: ImageReward's BLIP "
                             "weights (THUDM/ImageReward on the Hub, a pickle) converted once to a transformers "
                             "BlipForImageTextRetrieval folder, and its MLP head as safetensors")
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        self.blip = load_pretrained(BlipForImageTextRetrieval, model, "ImageReward BLIP model", use_safetensors=True)
        self.blip.eval().requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer, model, "ImageReward tokenizer")
        self.head = AestheticHead(self.blip.config.text_config.hidden_size)
        self.head.load_state_dict(load_file(resolve_weights_file(head, "ImageReward head")))
        self.head.eval().requires_grad_(False)
        size = self.blip.config.vision_config.image_size
        self.preprocess = ClipImagePreprocess(size, (size, size))
        self.encoder_token = self.tokenizer.convert_tokens_to_ids("[ENC]") if "[ENC]" in self.tokenizer.get_vocab() \
            else None

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(images.device)
        input_ids = tokens.input_ids.clone()
        if self.encoder_token is not None:  # ImageReward marks the text as an image-grounded encoding
            input_ids[:, 0] = self.encoder_token
        pixels = self.preprocess(images).to(self.blip.dtype)
        image_tokens = self.blip.vision_model(pixel_values=pixels).last_hidden_state
        text = self.blip.text_encoder(
            input_ids=input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=images.device))
        raw = self.head(text.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (raw - SCORE_MEAN) / SCORE_STD
