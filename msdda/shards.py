"""Sharing a command's independent pieces of work (a sweep's cells, an evaluation's sample batches) among the
processes ``accelerate launch`` started, on CPUs, GPUs and nodes.

Each process takes every n-th piece (n processes) and computes it exactly as one process would: every piece
draws its noise from its own seeded generator, so results do not depend on which process computed them or on how
many there were (bit for bit at the same number of CPU threads per process: a reduction over more threads sums in
another order). Without a launch there is one process, which takes every piece.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch

from msdda.diffusion import resolve_device

__all__ = ["launch_state", "launch_device", "own_share"]

T = TypeVar("T")


def launch_state():
    """Accelerate's PartialState of this launch: gloo on the CPU where several processes run without CUDA (as
    msdda.train.distributed does for training)."""
    from accelerate import PartialState

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=several and not torch.cuda.is_available())


def launch_device(name: str, state) -> torch.device:
    """The device a process samples on: ``auto`` under several processes is the process's own (its GPU, or the CPU);
    otherwise msdda.diffusion.resolve_device."""
    if name == "auto" and state.num_processes > 1:
        return state.device
    return resolve_device(name)


def own_share(pieces: list[T], state) -> list[T]:
    """This process's pieces: every ``num_processes``-th from its index."""
    return pieces[state.process_index::state.num_processes]
