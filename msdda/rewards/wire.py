"""What a reward server and its client send each other: safetensors bytes, never pickle.

A request holds the images (``[B, 3, H, W]`` float32 in [0, 1], the Reward interface's input) under ``images``, and
the prompts as JSON in the file's metadata; an answer holds ``scores`` (``[B]`` float32). The images travel in their
memory layout (``dim_order``: their dimensions from the outermost in memory to the innermost, e.g. channels last from
a channels-last VAE) and are rebuilt with the same strides, because a reward's reductions sum in memory order: the
same values in another layout can score an ulp apart, and a remote score must equal the local one bit for bit. Both sides check what they read and raise :class:`WireError` saying what was wrong: the
server answers it with HTTP 400, the client counts it as a bad answer.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

__all__ = ["WireError", "encode_request", "decode_request", "encode_scores", "decode_scores", "CONTENT_TYPE"]

CONTENT_TYPE = "application/octet-stream"


class WireError(ValueError):
    """A request or answer that does not hold what the protocol says (the message says what was wrong)."""


def _read(data: bytes, name: str) -> tuple[torch.Tensor, dict[str, str]]:
    """The tensor ``name`` of safetensors ``data`` and the file's metadata (its JSON header's ``__metadata__``)."""
    try:
        tensors = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    except Exception as error:  # safetensors raises its own error type on truncated or foreign bytes
        raise WireError(f"not a safetensors file ({type(error).__name__}: {error})") from error
    if name not in tensors:
        raise WireError(f"holds {sorted(tensors)}, not {name!r}")
    return tensors[name], header.get("__metadata__") or {}


def encode_request(images: torch.Tensor, prompts: list[str]) -> bytes:
    images = images.detach().to("cpu", torch.float32)
    order = sorted(range(images.ndim), key=lambda dim: -images.stride(dim))  # stable: ties keep their order
    return save({"images": images.permute(order).contiguous()},
                metadata={"prompts": json.dumps(list(prompts)), "dim_order": json.dumps(order)})


def decode_request(data: bytes) -> tuple[torch.Tensor, list[str]]:
    """The images ``[B, 3, H, W]`` float32, in the memory layout they were sent in, and their B prompts."""
    stored, metadata = _read(data, "images")
    try:
        prompts = json.loads(metadata["prompts"])
        order = json.loads(metadata.get("dim_order", json.dumps(list(range(stored.ndim)))))
    except (KeyError, json.JSONDecodeError) as error:
        raise WireError("its metadata holds no JSON list of prompts under 'prompts' (and a dim_order)") from error
    if sorted(order) != list(range(stored.ndim)):
        raise WireError(f"dim_order {order} is not an order of the images' {stored.ndim} dimensions")
    images = stored.clone().permute([order.index(dim) for dim in range(stored.ndim)])  # clone: aligned memory
    if images.dtype != torch.float32 or images.ndim != 4 or images.shape[1] != 3:
        raise WireError(f"images must be [B, 3, H, W] float32, got {tuple(images.shape)} {images.dtype}")
    if not isinstance(prompts, list) or len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
        raise WireError(f"needs one prompt (a string) per image: {len(images)} images")
    return images, prompts


def encode_scores(scores: torch.Tensor) -> bytes:
    return save({"scores": scores.detach().to("cpu", torch.float32).reshape(-1).contiguous()})


def decode_scores(data: bytes, expected: int) -> torch.Tensor:
    """The ``[expected]`` float32 scores of an answer (NaN and inf included: the client decides about those)."""
    scores, _ = _read(data, "scores")
    if scores.dtype != torch.float32 or scores.shape != (expected,):
        raise WireError(f"{tuple(scores.shape)} {scores.dtype} scores for {expected} images")
    return scores
