"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub in offline mode, as this machine is (it reads HF_HUB_OFFLINE once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One ``MSDDA_CACHE`` for a test module, away from the user's: a shipped world assembled on first use (world-lv,
    world-flow) is built once for the module."""
    import os

    saved = os.environ.get("MSDDA_CACHE")
    os.environ["MSDDA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        del os.environ["MSDDA_CACHE"]
    else:
        os.environ["MSDDA_CACHE"] = saved


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; a test with other precision settings needs its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def exact_float32():
    """Float32 convolutions and matrix products in full precision on a GPU. cuDNN runs float32 convolutions in
    TF32 by default (a 10-bit mantissa), which on an H200 moved the trained KL of two equivalent code paths by
    3e-4 relative and their sampled latents by 7e-3, beyond the float-rounding tolerances that tests comparing
    code paths assert. No effect on the CPU."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
