"""The conditioning of a batch is ONE tensor ``[B, L, D]`` everywhere downstream: rollouts store it, updates index
its rows, guidance concatenates its negative and positive halves. A family whose denoiser takes more than a text
sequence (SD3's and FLUX's pooled projection, FLUX.1-dev's guidance scale, SDXL's pooled projection and time ids)
carries the extra vector ``[B, P]`` as ``ceil(P / D)`` zero-padded rows after the sequence
(:func:`pack_conditioning`), and its forward splits them off again (:func:`unpack_conditioning`), so that every
caller has one code path for every family.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_conditioning", "unpack_conditioning"]


def pack_conditioning(sequence: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Two conditioning tensors as one: the joint sequence ``[B, L, D]`` followed by the pooled projection ``[B, P]``
    zero-padded to ``ceil(P / D)`` rows of width D (see the module docstring)."""
    batch, _, width = sequence.shape
    rows = math.ceil(pooled.shape[1] / width)
    padded = torch.nn.functional.pad(pooled, (0, rows * width - pooled.shape[1]))
    return torch.cat([sequence, padded.reshape(batch, rows, width).to(sequence.dtype)], dim=1)


def unpack_conditioning(conditioning: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(joint sequence ``[B, L, D]``, pooled projection ``[B, pooled_dim]``) of a ``pack_conditioning`` tensor."""
    rows = math.ceil(pooled_dim / conditioning.shape[2])
    sequence, pooled = conditioning[:, :-rows], conditioning[:, -rows:]
    return sequence, pooled.reshape(len(conditioning), -1)[:, :pooled_dim]
