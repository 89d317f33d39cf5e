"""The embedded world's components: stock diffusers/transformers classes at a tiny size, and the classifier.

The pipeline is a stock ``StableDiffusionPipeline``: a 2x-downsampling ``AutoencoderKL`` (32x32 RGB <-> 16x16x4
latents; it earns its place by making every UNet forward cheaper than in pixel space), a
``UNet2DConditionModel`` with cross-attention only at 8x8, a small ``CLIPTextModel``, a ``CLIPTokenizer``
whose BPE merges are learned offline from the world's words, and a ``DDIMScheduler`` with SD's schedule. So
code written for Stable Diffusion 1.x runs on it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from msdda.errors import InputNotFound, UserError
from msdda.world.data import COLOURS, POSITIONS, SHAPES

__all__ = [
    "build_tokenizer",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "build_scheduler",
    "AttributeClassifier",
    "MAX_PROMPT_TOKENS",
]

MAX_PROMPT_TOKENS = 12
TEXT_DIM = 64
_WORDS = ["a", "an", "on", "the", "at", "in", "left", "right", "top", "bottom", "center", "centre",
          *COLOURS, *SHAPES]


def _learn_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE merges that make every word one token, learned deterministically.

    The most frequent adjacent pair merges first, ties broken lexicographically. (``tokenizers``' trainer breaks
    ties differently from run to run, which would make pretraining irreproducible.)
    """
    special = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = sorted({c for word in words for c in word})
    vocab = {token: i for i, token in enumerate(special + alphabet + [c + "</w>" for c in alphabet])}
    spellings = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while any(len(symbols) > 1 for symbols in spellings.values()):
        counts: dict[tuple[str, str], int] = {}
        for symbols in spellings.values():
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for word, symbols in spellings.items():
            merged, index = [], 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    merged.append(best[0] + best[1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            spellings[word] = merged
    return vocab, merges


def build_tokenizer():
    """A ``CLIPTokenizer`` whose BPE merges, learned here from the world's words, make each word one token."""
    from transformers import CLIPTokenizer

    vocab, merges = _learn_bpe(_WORDS)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)
    for word in _WORDS:
        pieces = tokenizer.tokenize(word)
        if pieces != [f"{word}</w>"]:
            raise RuntimeError(f"world tokenizer splits {word!r} into {pieces}; the learned merges are incomplete")
    return tokenizer


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_PROMPT_TOKENS,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=TEXT_DIM)
    return CLIPTextModel(config)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                         layers_per_block=1, norm_num_groups=16, sample_size=32)


def build_unet(out_channels: int = 4):
    """The world's UNet; ``out_channels=8`` adds the variance channels a ``learned_range`` scheduler reads."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=out_channels, block_out_channels=(48, 96),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=8, norm_num_groups=16)


def build_scheduler():
    """Stable Diffusion 1.x's DDIM schedule; sample with eta > 0 for Gaussian step kernels."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


class AttributeClassifier(nn.Module):
    """Reads colour, shape and position from a 32x32 image in [0, 1]; the consistency reward's judge."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 8 * 8, 128), nn.SiLU(),
        )
        self.colour = nn.Linear(128, len(COLOURS))
        self.shape = nn.Linear(128, len(SHAPES))
        self.position = nn.Linear(128, len(POSITIONS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (colour, shape, position) for images ``[B, 3, 32, 32]`` in [0, 1]."""
        hidden = self.features(images * 2 - 1)
        return self.colour(hidden), self.shape(hidden), self.position(hidden)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(
            {"width": self.width, "colours": list(COLOURS), "shapes": list(SHAPES), "positions": list(POSITIONS)},
            indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> AttributeClassifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        config_file, weights_file = folder / "config.json", folder / "model.safetensors"
        if not weights_file.is_file() or not config_file.is_file():
            raise InputNotFound(
                f"no attribute classifier in {folder} (want config.json and model.safetensors); "
                "run `msdda world pretrain` or reinstall msdda"
            )
        config = json.loads(config_file.read_text())
        if config["colours"] != list(COLOURS) or config["shapes"] != list(SHAPES) or config["positions"] != list(POSITIONS):
            raise UserError(f"the classifier in {folder} was trained on another grammar: {config}")
        model = cls(width=config["width"])
        model.load_state_dict(load_file(weights_file))
        return model.eval()
