"""Where msdda builds the worlds it assembles from its shipped files (``world-lv``, ``world-flow``), once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "built_once"]


BUILD_VERSION = b"2"
"""Part of every built folder's name: a build that wrote its folders differently builds anew instead of reusing them
(version 1, before 2026-12-08, left a world built by a process other than rank 0 without its text encoders' weights)."""


def cache_dir() -> Path:
    """Where msdda writes what it builds from its shipped files: ``$MSDDA_CACHE``, else ``~/.cache/msdda``."""
    return Path(os.environ.get("MSDDA_CACHE") or Path.home() / ".cache" / "msdda")


def built_once(cache: Path, name: str, sources: list[Path], build: Callable[[], Any]) -> Path:
    """``cache/<name>-<digest>/pipeline``: the pipeline ``build()`` returns, saved there the first time and reused
    after, where the digest is that of ``BUILD_VERSION`` and the bytes of every file in ``sources`` (what it is built
    from), so a changed source or build builds anew.

    Built by one process at a time (a file lock beside it), in a temporary folder renamed into place, so a process
    that finds the folder finds it whole; building draws random numbers (initialising the parts), so it runs on a
    forked random stream, leaving the caller's alone."""
    import torch

    from filelock import FileLock

    digest = hashlib.sha256(BUILD_VERSION + b"".join(path.read_bytes() for path in sources)).hexdigest()
    target = cache / f"{name}-{digest[:16]}"
    if not (target / "pipeline" / "model_index.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # the processes of one launch all ask for it at once: one builds, the others wait and find it built
        with FileLock(str(cache / f".{target.name}.lock")):
            if not (target / "pipeline" / "model_index.json").is_file():
                building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
                with torch.random.fork_rng():
                    pipeline = build()
                _save_pipeline(pipeline, building / "pipeline")
                os.rename(building, target)
    return target / "pipeline"


def _save_pipeline(pipeline, folder: Path) -> None:
    """``pipeline.save_pretrained(folder)``, with every transformers model's config and weights written by this process.

    Once torch.distributed is initialised (under ``accelerate launch``), transformers' ``save_pretrained`` writes a
    model's files on global rank 0 only, and leaves the folder empty elsewhere; the process that builds here is
    whichever took the lock first (and on another node, never rank 0). The weights go through safetensors'
    ``save_model``, which writes shared tensors once, as ``save_pretrained`` does."""
    from safetensors.torch import save_model
    from transformers import PreTrainedModel

    pipeline.save_pretrained(folder, safe_serialization=True)
    for name, component in pipeline.components.items():
        if isinstance(component, PreTrainedModel) and not (folder / name / "model.safetensors").is_file():
            component.config.save_pretrained(folder / name)
            save_model(component, str(folder / name / "model.safetensors"), metadata={"format": "pt"})
