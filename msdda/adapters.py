"""Reward adapters on disk: diffusers-format LoRA weights, the metadata fusion checks, and a model card.

An adapter folder holds ``pytorch_lora_weights.safetensors`` (what ``pipe.load_lora_weights(folder)`` loads in
stock diffusers, for the base's pipeline class: StableDiffusionPipeline, StableDiffusion3Pipeline or FluxPipeline),
``msdda_adapter.json`` (reward, beta, step-reward estimator, base model and a hash of its denoiser's weights,
pipeline class, scheduler, sampling settings including a flow sampler's noise level and shift (or FLUX's dynamic
shift mu) and the image resolution, LoRA settings,
training summary) and ``README.md`` with the Hub's YAML front matter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msdda.errors import InputNotFound, UserError

if TYPE_CHECKING:
    import torch

__all__ = ["AdapterMetadata", "save_adapter", "write_metadata", "copy_adapter", "load_adapter_metadata", "resolve_adapter", "weights_hash",
           "check_adapter_weights", "METADATA_FILE", "WEIGHTS_FILE", "SHIPPED_PREFIX", "shipped_adapters"]

METADATA_FILE = "msdda_adapter.json"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
FORMAT_VERSION = 1


@dataclasses.dataclass
class AdapterMetadata:
    """What an adapter was trained for and on; fusion refuses adapters whose fields disagree."""

    reward_name: str
    reward_version: str
    beta: float
    step_reward: str
    base_model: str
    base_model_hash: str
    scheduler_class: str
    scheduler_config: dict[str, Any]
    num_inference_steps: int
    eta: float | None
    """DDIM's eta (None for a flow sampler, whose noise is ``flow_noise_level``)."""
    guidance_scale: float
    lora_rank: int
    lora_alpha: float
    lora_target_modules: list[str]
    training: dict[str, Any]
    msdda_version: str = ""
    format_version: int = FORMAT_VERSION
    reward_spec: str = ""
    """How training named the reward to ``load_reward``: a registered name, or a user reward's 'module:attribute'
    (whose ``reward_name`` is only the class's own name). Empty in adapters written before it was recorded."""
    reward_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The reward's constructor arguments in training (``reward.kwargs``)."""
    pipeline_class: str = "StableDiffusionPipeline"
    """The base's diffusers pipeline class, whose ``load_lora_weights`` loads the weights (older adapters: SD)."""
    flow_noise_level: float | None = None
    """A flow sampler's SDE noise level a (Flow-GRPO's ``noise_level``); None for DDPM/DDIM."""
    flow_shift: float | None = None
    """A flow sampler's fixed schedule shift (FlowMatchEulerDiscreteScheduler's ``shift``); None for DDPM/DDIM and for
    a dynamic shift (``flow_mu``)."""
    flow_mu: float | None = None
    """FLUX's dynamic shift mu, which FluxPipeline computes from the image's sequence length (so from the resolution);
    None for a fixed shift."""
    resolution: int | None = None
    """The side in pixels of the images trained on; None: the pipeline's default (and in older adapters)."""
    max_sequence_length: int | None = None
    """T5's token count of the prompts trained on (SD3, FLUX); None: the pipeline's default."""
    optimality: dict[str, Any] | None = None
    """The optimality gauge (msdda.train.gauge) at the end of training: per step, how near the adapter is to its step
    optimum, and the beta it implies; None where it was not measured (no reward gradient, or older adapters)."""
    step_scales: list[dict[str, float]] | None = None
    """Per-step factors of the LoRA (msdda.step_scales: ``{"step", "timestep", "scale"}`` per step; 0 switches the
    adapter off at that step), fitted to its restricted step optimum at ``beta``; None: the LoRA at scale 1 at every
    step."""
    weights: str = "raw"
    """Which of a run's weights the file holds: ``raw`` (the optimizer's) or ``ema`` (their exponential moving average;
    ``training['ema']`` gives its decay and start step). Older adapters: raw."""

    @property
    def sampler_description(self) -> str:
        """The sampler in words, for the model card."""
        if self.flow_noise_level is not None:
            shift = f"shift {self.flow_shift}" if self.flow_mu is None else f"dynamic shift mu {self.flow_mu:.4f}"
            return (f"{self.scheduler_class} ({shift}) with Flow-GRPO's SDE step at noise level "
                    f"{self.flow_noise_level}, {self.num_inference_steps} steps")
        return f"{self.scheduler_class}, {self.num_inference_steps} steps, eta = {self.eta}"

    def trained_reward(self):
        """The reward this adapter was trained on, loaded the way training loaded it."""
        from msdda.rewards import load_reward

        return load_reward(self.reward_spec or self.reward_name, **self.reward_kwargs)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's base weights (names, dtypes, shapes, bytes), LoRA parameters excluded. Of a module
    that FSDP2 shards over processes it hashes the whole weights (gathered: every process must call it)."""
    import torch
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")  # a PEFT-wrapped layer hashes like the plain one
        tensor = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _optimality_summary(gauge: dict[str, Any] | None) -> str:
    """The gauge in the model card's words."""
    if not gauge:
        return "Not measured (the reward has no gradient, or the gauge was off)."
    worst, implied = gauge["max_ratio_deviation"], gauge["implied_beta"]
    worst = "unmeasured" if worst is None else f"{worst:.2f}"
    implied = "none (it does not move along the reward's gradient)" if implied is None else f"{implied:.3g}"
    return (f"On held-out states ({gauge['prompts']} prompts, from the reference and from the adapter, "
            f"{gauge['draws']} draws each), the adapter's mean shift against the step optimum's "
            f"(|d| / |d*|, 1 at the optimum) is off by at most {worst} at the steps that carry KL"
            f"{_scale_words(gauge.get('max_scale_deviation'))}; the beta at "
            f"which it is step-optimal is {implied} (trained at {gauge['beta']}). Per step: "
            f"`optimality` in `{METADATA_FILE}`.")


def _scale_words(deviation: float | None) -> str:
    """The scale condition in the model card's words (nothing for gauges that did not record it)."""
    if deviation is None:
        return ""
    return (f", and each step's shift is off the best multiple of itself (the optimum its LoRA can reach at that step) "
            f"by at most {deviation:.2f}")


def _step_scales_section(metadata: AdapterMetadata) -> str:
    """How to sample an adapter with per-step scales outside msdda (empty without them)."""
    if not metadata.step_scales:
        return ""
    scales = [round(float(entry["scale"]), 4) for entry in metadata.step_scales]
    off = [entry["step"] for entry in metadata.step_scales if float(entry["scale"]) == 0]
    return f"""
## Per-step scales
The LoRA is applied at each of the {metadata.num_inference_steps} steps with its own factor, fitted so that each step
sits at the adapter family's step optimum at beta = {metadata.beta} (`step_scales` in `{METADATA_FILE}`; off at steps
{off or 'none'}): {scales}. msdda applies them whenever it samples the adapter; with stock diffusers, set them
step by step:

```python
scales = {scales}
pipe.set_adapters(["default_0"], [scales[0]])

def per_step_scale(pipe, step, timestep, callback_kwargs):
    if step + 1 < len(scales):
        pipe.set_adapters(["default_0"], [scales[step + 1]])
    return callback_kwargs

images = pipe(prompt, num_inference_steps={metadata.num_inference_steps}, callback_on_step_end=per_step_scale).images
```
"""


def _model_card(metadata: AdapterMetadata) -> str:
    entries = {**metadata.training, "weights": metadata.weights}
    summary = "\n".join(f"- {key}: {value}" for key, value in entries.items())
    return f"""---
library_name: diffusers
base_model: {metadata.base_model}
tags:
- msdda
- lora
- text-to-image
- reinforcement-learning
- reward:{metadata.reward_name}
---

# msdda reward adapter: {metadata.reward_name}

A LoRA adapter (rank {metadata.lora_rank}, alpha {metadata.lora_alpha}, on {', '.join(metadata.lora_target_modules)})
for `{metadata.base_model}`, trained with step-level KL-regularised RL to raise the reward
`{metadata.reward_name}` (version {metadata.reward_version}) with KL weight beta = {metadata.beta} and the
`{metadata.step_reward}` step reward, sampling with {metadata.sampler_description}, guidance scale
{metadata.guidance_scale}.

```python
from diffusers import {metadata.pipeline_class}

pipe = {metadata.pipeline_class}.from_pretrained("{metadata.base_model}")
pipe.load_lora_weights("path/to/this/folder")
```

Fuse it with other msdda adapters trained on the same base model (`msdda fuse`): the metadata in
`{METADATA_FILE}` lets msdda check that they share base weights, scheduler and step count, and weight them
by their betas.

## Training summary
{summary}

## Distance from the step optimum
{_optimality_summary(metadata.optimality)}
{_step_scales_section(metadata)}"""


def save_adapter(folder: str | Path, unet, metadata: AdapterMetadata,
                 lora_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter atomically: into ``folder.tmp``, then renamed over ``folder``.

    ``unet`` is the denoiser carrying the LoRA (a UNet, or the transformer for ``metadata.pipeline_class``
    StableDiffusion3Pipeline or FluxPipeline). ``lora_state`` (PEFT keys) replaces its own LoRA values, e.g.
    DeepSpeed's float32 master copies.
    """
    from peft.utils import get_peft_model_state_dict

    from msdda.models import family_named

    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    # PEFT's key format throughout: diffusers' converter renames attention keys to its old format but not the
    # ResNet convs', and load_lora_weights then reads the mixed file as PEFT format and drops the attention keys
    if lora_state is None:
        lora_state = get_peft_model_state_dict(unet)
    family_named(metadata.pipeline_class).save_lora(temporary, unet, lora_state)  # as its load_lora_weights reads it
    write_metadata(temporary, metadata)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


def write_metadata(folder: Path, metadata: AdapterMetadata) -> None:
    """``msdda_adapter.json`` and the model card of ``metadata`` (stamped with this msdda's version) into ``folder``."""
    import msdda

    metadata = dataclasses.replace(metadata, msdda_version=msdda.__version__)
    (folder / METADATA_FILE).write_text(json.dumps(dataclasses.asdict(metadata), indent=2, default=str))
    (folder / "README.md").write_text(_model_card(metadata))


def copy_adapter(source: Path, folder: str | Path, metadata: AdapterMetadata) -> Path:
    """A copy of the adapter folder ``source`` with its LoRA weights' bytes as they are and ``metadata`` instead of
    its own, written atomically (``folder.tmp``, then renamed over ``folder``)."""
    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    shutil.copyfile(source / WEIGHTS_FILE, temporary / WEIGHTS_FILE)
    write_metadata(temporary, metadata)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


SHIPPED_PREFIX = "world:"
"""``world:<name>`` names a reference adapter shipped with the embedded world (``msdda/world/assets/adapters``)."""


def shipped_adapters() -> dict[str, Path]:
    """The reference adapters shipped inside the package, by short name (``world:aesthetic`` -> its folder)."""
    folder = Path(__file__).parent / "world" / "assets" / "adapters"
    if not folder.is_dir():
        return {}
    return {f"{SHIPPED_PREFIX}{child.name}": child for child in sorted(folder.iterdir())
            if (child / WEIGHTS_FILE).is_file()}


def resolve_adapter(source: str) -> Path:
    """A shipped reference adapter (``world:<name>``), a local adapter folder, or a Hub repo id downloaded (or
    taken from the cache) with huggingface_hub; its weights file checked by :func:`check_adapter_weights`."""
    folder = _adapter_folder(source)
    check_adapter_weights(folder, source)
    return folder


def check_adapter_weights(folder: Path, source: str) -> None:
    """Refuse a weights file that is truncated, corrupted or holds no LoRA, reading only its header and tensor table.

    safetensors checks that the header parses and that its tensors' byte ranges cover the file exactly, so a cut or
    overwritten file fails here, before any model loads, rather than inside ``load_lora_weights`` after the base
    has loaded. The tensors' bytes are not read (that would cost what loading does)."""
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="numpy") as weights:
            names = list(weights.keys())
    except SafetensorError as error:
        raise UserError(f"adapter {source!r}: {path} is not a whole safetensors file ({error}); it is truncated or "
                        "corrupted: copy the adapter folder again, or use another copy (each checkpoint's adapter/ "
                        "folder holds one)") from error
    if not any("lora_" in name for name in names):
        raise UserError(f"adapter {source!r}: {path} holds no LoRA weights ({len(names)} tensors, none named lora_*); "
                        "give the final/ (or a checkpoint's adapter/) folder that msdda train wrote")


def _adapter_folder(source: str) -> Path:
    if source.startswith(SHIPPED_PREFIX):
        shipped = shipped_adapters()
        if source not in shipped:
            raise InputNotFound(f"no reference adapter {source!r} ships with msdda; the shipped ones are "
                                f"{sorted(shipped) or 'none (this install has no msdda/world/assets/adapters)'}")
        return shipped[source]
    path = Path(source)
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise InputNotFound(f"adapter {source!r} has no {WEIGHTS_FILE}: give the final/ (or a checkpoint's "
                                "adapter/) folder that msdda train wrote")
        return path
    if path.exists() or source.count("/") != 1:
        raise InputNotFound(f"adapter {source!r} is neither a folder nor a Hub repo id like 'user/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json", "README.md"]))
    except Exception as error:  # huggingface_hub raises several types for offline / missing repos
        raise InputNotFound(f"cannot fetch adapter {source!r} from the Hub ({type(error).__name__}: {error}); "
                                "download it to a folder and pass the folder") from error


def load_adapter_metadata(folder: str | Path) -> AdapterMetadata:
    """The metadata of a local adapter folder; a clear error when it is missing or malformed."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise InputNotFound(f"{folder} has no {METADATA_FILE}: it is not an msdda adapter folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg}); restore the "
                        "file from a copy of the adapter, or re-save the adapter") from error
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object of adapter fields, got {type(data).__name__}")
    names = {field.name for field in dataclasses.fields(AdapterMetadata)}
    optional = {field.name for field in dataclasses.fields(AdapterMetadata)
                if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING}
    missing = sorted(names - set(data) - optional)
    if missing:
        raise UserError(f"{path} lacks the fields {missing}")
    return AdapterMetadata(**{key: value for key, value in data.items() if key in names})
