"""Where msdda builds the worlds it assembles from its shipped files (``world-lv``, ``world-flow``), once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "built_once"]


def cache_dir() -> Path:
    """Where msdda writes what it builds from its shipped files: ``$MSDDA_CACHE``, else ``~/.cache/msdda``."""
    return Path(os.environ.get("MSDDA_CACHE") or Path.home() / ".cache" / "msdda")


def built_once(cache: Path, name: str, sources: list[Path], build: Callable[[], Any]) -> Path:
    """``cache/<name>-<digest>/pipeline``: the pipeline ``build()`` returns, saved there the first time and reused
    after, where the digest is that of the bytes of every file in ``sources`` (what it is built from), so a changed
    source builds anew.

    Built by one process at a time (a file lock beside it), in a temporary folder renamed into place, so a process
    that finds the folder finds it whole; building draws random numbers (initialising the parts), so it runs on a forked random stream, leaving the caller's alone."""
    import torch

    from filelock import FileLock

    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    target = cache / f"{name}-{digest[:16]}"
    if not (target / "pipeline" / "model_index.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # the processes of one launch all ask for it at once: one builds, the others wait and find it built (two
        # building side by side left a folder without the text encoder's weights under accelerate launch)
        with FileLock(str(cache / f".{target.name}.lock")):
            if not (target / "pipeline" / "model_index.json").is_file():
                building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
                with torch.random.fork_rng():
                    pipeline = build()
                pipeline.save_pretrained(building / "pipeline", safe_serialization=True)
                os.rename(building, target)
    return target / "pipeline"
