"""PEFT mixed-adapter batches: route each batch row of a denoiser's LoRA layers to one adapter (or to none, the
reference), so that the kernels of several adapters and the base come from one batched forward.

diffusers' UNet and transformer forwards take no ``adapter_names``, so :func:`mixed_adapter_batch` hands the routing
to each PEFT LoRA layer with forward hooks; :func:`checkpoint_keeping_adapter_routing` makes gradient checkpointing
recompute a block with the routing its forward ran with. The state this needs across calls lives here and nowhere
else: the routings now running (innermost last, read by the checkpointing) and each model's LoRA layers, found once
per set of loaded adapters.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.utils.checkpoint

from msdda.models.base import unwrapped

__all__ = ["BASE", "mixed_adapter_batch", "checkpoint_keeping_adapter_routing", "lora_layers"]

BASE = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch: the reference model's rows."""

_active_routings: list[list[str]] = []
"""The ``adapter_names`` of the mixed-adapter batches now running, innermost last."""


_lora_layer_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lora_layers(model: torch.nn.Module, layer_class: type) -> list[torch.nn.Module]:
    """``model``'s PEFT LoRA layers, found once per set of loaded adapters: walking the UNet's modules on every
    step of a studio render costs it about a twentieth of its time."""
    adapters = tuple(getattr(unwrapped(model), "peft_config", {}))
    if not adapters:  # a block of a model (gradient checkpointing): no adapter list to key on, and it is small
        return [module for module in model.modules() if isinstance(module, layer_class)]
    cached = _lora_layer_cache.get(model)
    if cached is None or cached[0] != adapters:
        cached = adapters, [module for module in model.modules() if isinstance(module, layer_class)]
        _lora_layer_cache[model] = cached
    return cached[1]


def _contiguous_runs(names: list[str]) -> list[tuple[str, int, int]]:
    """``names`` as runs of one name: (name, first row, row after the last)."""
    runs: list[tuple[str, int, int]] = []
    for row, name in enumerate(names):
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], row + 1)
        else:
            runs.append((name, row, row + 1))
    return runs


@contextmanager
def mixed_adapter_batch(unet, adapter_names: list[str]):
    """Route batch row i of every LoRA layer to adapter ``adapter_names[i]`` (PEFT mixed-adapter batches).

    diffusers' UNet and SD3 transformer forwards have no ``adapter_names`` argument, so we hand it to each PEFT LoRA
    layer with a forward pre-hook. Under gradient checkpointing, enable it with ``checkpoint_keeping_adapter_routing``
    so that backward recomputes each block with the same routing.

    Our batches hold each adapter's rows together, and PEFT's mixed batch gathers and scatters every adapter's rows
    by a list of indices (built in Python) in every layer at every step. So a vanilla LoRA linear or convolution
    layer runs its base layer alone (all rows routed to ``__base__``) and a forward hook adds each adapter's
    ``lora_B(lora_A(dropout(x))) * scaling`` to its rows' slice, PEFT's arithmetic on views; layers of other kinds
    or with LoRA variants (DoRA) keep PEFT's own routing.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear, _ConvNd

    runs = _contiguous_runs(adapter_names)
    only_base = [BASE] * len(adapter_names)

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    def base_only(module, args, kwargs):
        kwargs["adapter_names"] = only_base
        return args, kwargs

    def add_adapters(module, args, kwargs, result):
        x = args[0]
        for name, first, after in runs:
            if name in module.lora_A:
                lora_a = module.lora_A[name]
                update = module.lora_B[name](lora_a(module.lora_dropout[name](x[first:after].to(lora_a.weight.dtype))))
                result[first:after] += (update * module.scaling[name]).to(result.dtype)
        return result

    handles = []
    for module in lora_layers(unet, LoraLayer):
        if isinstance(module, (Linear, _ConvNd)) and not module.lora_variant:
            handles += [module.register_forward_pre_hook(base_only, with_kwargs=True),
                        module.register_forward_hook(add_adapters, with_kwargs=True)]
        else:
            handles.append(module.register_forward_pre_hook(inject, with_kwargs=True))
    _active_routings.append(adapter_names)
    try:
        yield
    finally:
        _active_routings.pop()
        for handle in handles:
            handle.remove()


def checkpoint_keeping_adapter_routing(block, *args):
    """diffusers' gradient checkpointing (non-reentrant), recomputing ``block`` with the mixed-adapter routing
    its forward ran with. diffusers' default recomputes in backward, after ``mixed_adapter_batch`` has ended, so
    the reference's rows (adapter off) would be recomputed with the adapter on."""
    names = _active_routings[-1] if _active_routings else None

    def contexts():
        return nullcontext(), mixed_adapter_batch(block, names) if names is not None else nullcontext()

    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=contexts)


