"""``MSDDAPipeline``: a diffusers pipeline that samples K reward adapters fused at sampling time.

    pipe = MSDDAPipeline.from_pretrained("world", adapters=["runs/aesthetic/final", "runs/consistency/final"])
    images = pipe("a red circle on the left", weights=[0.3, 0.7], generator=torch.Generator().manual_seed(0)).images

``MSDDAPipeline.from_pretrained`` dispatches on the base's pipeline class: a StableDiffusionPipeline base gives an
``MSDDAPipeline`` (a StableDiffusionPipeline), a StableDiffusion3Pipeline base an ``MSDDA3Pipeline`` (a
StableDiffusion3Pipeline), a FluxPipeline base an ``MSDDAFluxPipeline`` (a FluxPipeline). Each is the stock class plus
the same fusing code (``_Fusing``), so each keeps its own
components, ``encode_prompt``, LoRA loader and ``save_pretrained``; one entry point means `msdda fuse`, sweeps and
evaluation need not know which it is.

Speaks the stock pipelines' argument names (prompt, num_inference_steps, guidance_scale, eta, generator,
output_type) and adds ``weights``, ``method`` and, for flow adapters, ``flow_noise_level``. Before sampling it
checks the adapters' metadata: same base weights (content hash), same sampler (pipeline class, scheduler, step
count, a flow sampler's noise level and shift), known betas.

With ``return_kl=True`` it also measures each sample's path KL to the base along the method's own trajectory
(``output.path_kl``), and to comparison adapters (e.g. retrained oracles) loaded with
:meth:`MSDDAPipeline.load_comparison_adapters`, which no method ever fuses.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from msdda.adapters import METADATA_FILE, AdapterMetadata, load_adapter_metadata, resolve_adapter, weights_hash
from msdda.diffusion import (
    BASE,
    absent_components,
    decode_latents,
    denoiser_of,
    dynamic_shift_mu,
    encode_prompts,
    latent_shape,
    pipeline_class_name,
    resolve_base,
    uses_guidance,
)
from msdda.errors import InputNotFound, UserError
from msdda.fuse.closed_form import objective_beta
from msdda.fuse.methods import FusionContext, PathKL, get_method
from msdda.fuse.methods.base import OPTIMAL_SCALE
from msdda.fuse.methods.rgg import check_rgg_scale
from msdda.fuse.optimality import warn_far_from_optimum
from msdda.fuse.sampler import sample_latents
from msdda.models import ModelFamily, family_named
from msdda.step_scales import register_step_scales

__all__ = ["MSDDAPipeline", "MSDDA3Pipeline", "MSDDAFluxPipeline", "MSDDAPipelineOutput", "LoadedAdapter",
           "read_adapters", "fusing_class"]

_SCHEDULERS = {"DDIMScheduler": DDIMScheduler, "DDPMScheduler": DDPMScheduler,
               "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler}


@dataclass(frozen=True)
class LoadedAdapter:
    """One reward adapter as the pipeline holds it: its PEFT adapter name, where it came from, its KL weight."""

    name: str
    source: str
    folder: Path
    metadata: AdapterMetadata | None
    beta: float


@dataclass
class MSDDAPipelineOutput(StableDiffusionPipelineOutput):
    """The stock output plus, with ``return_kl=True``, the samples' path KLs (``path_kl.totals``: "__base__" and
    each comparison adapter named in ``kl_to``, one float64 value per image)."""

    path_kl: PathKL | None = None

    @property
    def kl_to_base(self) -> torch.Tensor | None:
        return None if self.path_kl is None else self.path_kl.totals[BASE]


SAME_SAMPLER_FIELDS = ("pipeline_class", "scheduler_class", "num_inference_steps", "flow_noise_level", "flow_shift",
                       "flow_mu", "resolution", "max_sequence_length")
"""The metadata fields adapters must share to be fused: the step kernels they were trained on (a flow adapter's
kernel depends on its SDE's noise level and on the shifted schedule, FLUX's dynamic shift on the resolution, not
only on the scheduler's class; every adapter is fed one conditioning, encoded with one T5 length)."""


def _check_same_sampler(source: str, metadata: AdapterMetadata, first: tuple[str, AdapterMetadata]) -> None:
    for field in SAME_SAMPLER_FIELDS:
        ours, theirs = getattr(metadata, field), getattr(first[1], field)
        if ours != theirs:
            raise UserError(f"adapter {source}: {field} is {ours!r} but adapter {first[0]} has {theirs!r}; "
                            "fuse adapters trained with the same sampler")


def read_adapters(sources: list[str], betas: list[float] | None = None) -> list[LoadedAdapter]:
    """Resolve and check the adapters before any model is loaded: each folder (or Hub id) exists and holds
    LoRA weights, their metadata agree on the sampler, and every adapter has a beta (recorded or given)."""
    if betas is not None and len(betas) != len(sources):
        raise UserError(f"got {len(sources)} adapters but {len(betas)} betas; give one beta per adapter")
    adapters, first = [], None
    for index, source in enumerate(sources):
        folder = resolve_adapter(source)
        metadata = load_adapter_metadata(folder) if (folder / METADATA_FILE).is_file() else None
        if metadata is not None:
            first = first or (source, metadata)
            _check_same_sampler(source, metadata, first)
        if betas is None and metadata is None:
            raise UserError(f"adapter {source} records no beta (no {METADATA_FILE}); pass betas=[...] (--betas on "
                            "the command line)")
        beta = float(betas[index] if betas is not None else metadata.beta)
        adapters.append(LoadedAdapter(f"adapter_{index}", source, folder, metadata, beta))
    if first is not None and first[1].scheduler_class not in _SCHEDULERS:
        raise UserError(f"adapters were trained with {first[1].scheduler_class}, which msdda cannot sample")
    return adapters


def _weighted_reward(rewards: Sequence, weights: Sequence[float]):
    """``reward(images, prompts, grad=False)``: sum_i w_i r_i(images, prompts), differentiable with ``grad=True``
    (asked of the rewards only then: a plain reward function scores without it)."""
    def reward(images: torch.Tensor, prompts: Sequence[str], grad: bool = False) -> torch.Tensor:
        asked = {"grad": True} if grad else {}
        return sum(w * r(images, prompts, **asked) for w, r in zip(weights, rewards))

    return reward


def _check_pipeline_class(adapters: list[LoadedAdapter], base: str, declared: str) -> None:
    """Refuse, before the base loads, adapters trained on a base of another pipeline class (a flow world adapter
    on the UNet world), naming the base each records so that the fix is one flag."""
    for adapter in adapters:
        metadata = adapter.metadata
        if metadata is not None and metadata.pipeline_class != declared:
            raise UserError(f"adapter {adapter.source} was trained on base {metadata.base_model!r} (a "
                            f"{metadata.pipeline_class}), not on {base!r} (a {declared}): fuse it on its own base, "
                            f"--base {metadata.base_model} (base={metadata.base_model!r} in Python)")


@contextmanager
def _expected_lora_notices_silenced():
    """Loading K reward adapters makes diffusers and PEFT say two things that are true of every msdda fusion: the
    adapters hold no text-encoder LoRA (msdda trains the denoiser), and the denoiser holds several adapters (the
    point of fusing). Printed for every adapter of every command, they would bury real warnings; other messages pass."""
    lora_logger = logging.getLogger("diffusers.loaders.lora_base")
    level = lora_logger.level
    lora_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")
            yield
    finally:
        lora_logger.setLevel(level)


class _Fusing:
    """The fusing half of ``MSDDAPipeline``, ``MSDDA3Pipeline``, ``MSDDAFluxPipeline`` (and every family's fusing
    pipeline, :func:`fusing_class`), mixed into a stock diffusers pipeline class.

    Beside the stock components it holds ``base_model`` (the name it was loaded from), ``base_hash`` (of the
    stored denoiser weights, which adapters record) and ``adapters`` (the loaded :class:`LoadedAdapter`s).
    """

    family: ModelFamily
    """The model family of the stock class (set by :func:`fusing_class`)."""
    base_model: str = ""
    base_hash: str = ""
    adapters: list[LoadedAdapter] = []
    comparison_adapters: dict[str, LoadedAdapter] = {}

    @classmethod
    def from_pretrained(cls, base: str, adapters: list[str] | tuple[str, ...] = (), betas: list[float] | None = None,
                        **kwargs) -> MSDDAPipeline:
        """The base with ``adapters`` loaded, as the class its ``model_index.json`` names: an ``MSDDAPipeline`` for
        Stable Diffusion, an ``MSDDA3Pipeline`` for Stable Diffusion 3, an ``MSDDAFluxPipeline`` for FLUX."""
        checked = read_adapters(list(adapters), betas)  # bad adapter input fails before the base loads
        declared = pipeline_class_name(base)
        _check_pipeline_class(checked, base, declared)
        target = fusing_class(family_named(declared))
        location = resolve_base(base)
        kwargs.setdefault("local_files_only", Path(location).is_dir())
        # adapters record the hash of the stored weights: hash them as stored, then cast (torch_dtype=float16 works)
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        pipeline = super(_Fusing, target).from_pretrained(
            location, **(target.family.loading_kwargs | absent_components(location) | kwargs))
        denoiser = denoiser_of(pipeline)
        pipeline.base_model = base
        pipeline.base_hash = weights_hash(denoiser)
        if dtype is not None and dtype != denoiser.dtype:
            pipeline.to(dtype=dtype)
        pipeline.adapters, pipeline.comparison_adapters = [], {}
        denoiser.requires_grad_(False)
        pipeline._load_checked(checked)
        return pipeline

    # ------------------------------------------------------------------------------------------- adapters
    def load_adapters(self, sources: list[str], betas: list[float] | None = None) -> None:
        """Check each adapter's metadata against the base and the others, then load its LoRA."""
        self._load_checked(read_adapters(sources, betas))

    def load_comparison_adapters(self, sources: dict[str, str]) -> None:
        """Load adapters to measure KLs against (``{name: folder or Hub id}``, e.g. the oracles retrained on a
        weighted reward), checked like the reward adapters (same base, same sampler). They share the base, so
        their kernels come from the same denoiser; no method fuses them (methods see the reward adapters only)."""
        taken = {adapter.name for adapter in self.adapters} | set(self.comparison_adapters) | {BASE}
        clashing = sorted(taken & set(sources))
        if clashing:
            raise UserError(f"comparison adapter names {clashing} are taken (by {sorted(taken)}); choose others")
        checked = [replace(adapter, name=name) for name, adapter in zip(sources, read_adapters(list(sources.values())))]
        first = next(((a.source, a.metadata) for a in self.adapters if a.metadata is not None), None)
        for adapter in checked:
            if first is not None and adapter.metadata is not None:
                _check_same_sampler(adapter.source, adapter.metadata, first)
        self._check_base(checked)
        self._load_lora(checked)
        self.comparison_adapters.update({adapter.name: adapter for adapter in checked})

    def _load_checked(self, adapters: list[LoadedAdapter]) -> None:
        if not adapters:
            return
        if self.adapters:
            raise UserError("this pipeline holds adapters already; load them all in one call (or a new pipeline)")
        self._check_base(adapters)
        self._load_lora(adapters)
        self.adapters = list(adapters)
        first = next((adapter.metadata for adapter in adapters if adapter.metadata is not None), None)
        if first is not None:
            self.scheduler = _SCHEDULERS[first.scheduler_class].from_config(first.scheduler_config)

    def _check_base(self, adapters: list[LoadedAdapter]) -> None:
        for adapter in adapters:
            metadata = adapter.metadata
            if metadata is not None and metadata.base_model_hash != self.base_hash:
                raise UserError(f"adapter {adapter.source}: base_model_hash {metadata.base_model_hash[:12]}… "
                                f"(trained on {metadata.base_model}) differs from this base's {self.base_hash[:12]}… "
                                f"({self.base_model}); MSDDA needs one reference model: fuse on the base it was "
                                f"trained on (--base {metadata.base_model})")
        unchecked = [adapter.source for adapter in adapters if adapter.metadata is None]
        if unchecked:
            warnings.warn(f"adapters {unchecked} carry no msdda metadata: their base model, scheduler and step "
                          "count cannot be checked", stacklevel=4)
        warn_far_from_optimum([adapter.source for adapter in adapters], [adapter.metadata for adapter in adapters],
                              stacklevel=4)
        trained_on = {adapter.metadata.pipeline_class for adapter in adapters if adapter.metadata is not None}
        if trained_on - {self.family.name}:
            raise UserError(f"adapters trained on a {sorted(trained_on - {self.family.name})[0]} base "
                            f"cannot be fused on this {self.family.name} base ({self.base_model})")

    def _load_lora(self, adapters: list[LoadedAdapter]) -> None:
        with _expected_lora_notices_silenced():
            for adapter in adapters:
                self.load_lora_weights(adapter.folder, adapter_name=adapter.name)
                if adapter.metadata is not None and adapter.metadata.step_scales is not None:
                    register_step_scales(denoiser_of(self), adapter.name, adapter.metadata.step_scales)

    @property
    def betas(self) -> list[float]:
        return [adapter.beta for adapter in self.adapters]

    def recorded(self, field: str, fallback):
        """The first adapter's recorded metadata ``field`` (a sampler default: steps, guidance, eta, ...), or
        ``fallback`` where no adapter carries metadata."""
        for adapter in self.adapters:
            if adapter.metadata is not None:
                return getattr(adapter.metadata, field)
        return fallback

    # ---------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], weights: list[float] | None = None, method: str = "msdda",
                 beta: float | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, eta: float | None = None,
                 flow_noise_level: float | None = None, negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 max_sequence_length: int | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", rewards: list | None = None, code_candidates: int = 20,
                 code_block: int = 5, rgg_scale: float | str = OPTIMAL_SCALE, return_dict: bool = True,
                 return_kl: bool = False,
                 kl_to: Sequence[str] = (), return_reference_x0: bool = False, defer_kl: bool = False):
        """Sample with the adapters fused by ``method`` at ``weights`` (one per adapter).

        ``beta`` is the fused objective's KL weight (default: sum_i w_i beta_i / sum_i w_i, the adapters' common
        beta when they share one). ``rewards`` (one per adapter) are needed only by the methods that call them while
        sampling (``"code"``; ``"rgg"``, whose rewards must be differentiable). ``rgg_scale`` is RGG's step scale:
        ``"optimal"`` (s_t^2 / beta, the first-order step optimum) or a number. Defaults for
        steps, guidance, eta (for flow adapters: ``flow_noise_level``, the flow SDE's noise level), the image size
        (``height``, ``width``: the adapters' resolution, else the pipeline's default) and T5's
        ``max_sequence_length`` come from the adapters' metadata; for FLUX.1-dev ``guidance_scale`` is its distilled
        guidance. ``return_kl`` measures each sample's path KL to the base, and to each comparison adapter named in
        ``kl_to``, in ``output.path_kl`` (NaN for a method without a Gaussian kernel); the images are the same with
        and without it. ``return_reference_x0`` (with ``return_kl``) also keeps the base's x0 estimate at every
        state of the trajectory in ``output.path_kl.reference_x0`` (empty for a method without a Gaussian kernel):
        the images the ``tweedie`` step reward scores. ``defer_kl`` (with ``return_kl``) leaves the measuring
        forwards for ``output.path_kl.complete()``: the images come first, the same as without it.
        """
        fusion = get_method(method)
        count = len(self.adapters)
        if fusion.needs_adapters and count == 0:
            raise UserError(f"method {method!r} needs adapters; load some with adapters=[...]")
        weights = list(weights) if weights is not None else ([1.0 / count] * count if count else [])
        if len(weights) != count:
            raise UserError(f"got {len(weights)} weights for {count} adapters; give one weight per adapter")
        powers = fusion.exponents(weights, self.betas, beta) if count else []
        num_inference_steps = num_inference_steps or self.recorded("num_inference_steps", 50)
        guidance_scale = (self.recorded("guidance_scale", self.family.default_guidance_scale) if guidance_scale is None
                          else guidance_scale)
        height = height or self.recorded("resolution", None)
        width = width or self.recorded("resolution", None)
        self._warn_if_the_shift_moves(latents, height, width, num_inference_steps)
        noise, noise_name = self._noise_scale(eta, flow_noise_level)
        if noise == 0:
            warnings.warn(f"{noise_name}=0 makes every step deterministic: there is no precision to weight, so MSDDA "
                          "takes the equal-variance limit (the exponent-weighted mean of the kernels' means)",
                          stacklevel=2)
        reward = None
        if fusion.needs_rewards:
            if rewards is None or len(rewards) != count:
                raise UserError(f"method {method!r} scores samples while sampling: pass rewards=[one per adapter]")
            fusion.check_rewards(rewards)
            reward = _weighted_reward(rewards, [w / sum(weights) for w in weights] if fusion.normalises_weights
                                      else weights)
        rgg_scale = check_rgg_scale(rgg_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        positive, negative = encode_prompts(self, prompts, self._execution_device, negative_prompt, guidance_scale,
                                            max_sequence_length or self.recorded("max_sequence_length", None),
                                            (height, width))
        negative = negative if uses_guidance(negative, guidance_scale) else None
        names = [a.name for a in self.adapters]
        path_kl = self._path_kl(fusion, len(prompts), return_kl, kl_to, return_reference_x0, defer_kl)
        context = FusionContext(
            unet=denoiser_of(self), scheduler=self.scheduler, positive=positive, negative=negative,
            adapter_names=names, weights=weights, exponents=powers, guidance_scale=guidance_scale, eta=noise,
            generator=generator or torch.Generator().manual_seed(0), prompts=prompts, reward=reward,
            decode=lambda x, grad=False: decode_latents(self, x, grad=grad), code_candidates=code_candidates,
            code_block=code_block, beta=objective_beta(weights, self.betas, beta) if count else beta,
            rgg_scale=rgg_scale, path_kl=path_kl if fusion.gaussian else None)
        with fusion.active(self, names, weights):
            final = sample_latents(self, fusion, context, num_inference_steps, latents, height, width, self.progress_bar)
        images = decode_latents(self, final)  # already in [0, 1]
        images = self.image_processor.postprocess(images, output_type=output_type, do_denormalize=[False] * len(images))
        if not return_dict:
            return (images, None)
        return MSDDAPipelineOutput(images=images, nsfw_content_detected=None, path_kl=path_kl)

    def _warn_if_the_shift_moves(self, latents: torch.Tensor | None, height: int | None, width: int | None,
                                 num_inference_steps: int) -> None:
        """The dynamic shift (FLUX, Qwen-Image, FLUX.2) depends on the image size: sampled at another size than the
        adapters were trained at, every step's kernel is one they were not trained for, so the fusion is no longer
        exact for them."""
        trained = self.recorded("flow_mu", None)
        shape = tuple(latents.shape) if latents is not None else latent_shape(self, 1, height, width)
        mu = dynamic_shift_mu(self, shape, num_inference_steps)
        if trained is not None and mu is not None and not math.isclose(mu, trained, rel_tol=1e-6):
            warnings.warn(f"sampling {shape[-2]}x{shape[-1]} latents shifts the schedule by mu = {mu:.4f}, but the "
                          f"adapters were trained at mu = {trained:.4f} (resolution {self.recorded('resolution', None)}"
                          "): their step kernels are fused on steps they were not trained for", stacklevel=3)

    def _noise_scale(self, eta: float | None, flow_noise_level: float | None) -> tuple[float | None, str]:
        """The sampler's noise setting (msdda.diffusion.sampler_kernel) and its name: a flow sampler's noise level,
        DDIM's eta, or None for DDPM; defaults from the adapters' metadata."""
        return self.family.sampler_noise(self.scheduler, eta, flow_noise_level, self.recorded)

    def _path_kl(self, fusion, batch: int, return_kl: bool, kl_to: Sequence[str], return_reference_x0: bool,
                 defer_kl: bool) -> PathKL | None:
        """The meter a call records into: the base and the named comparison adapters as targets."""
        if not return_kl:
            if kl_to or return_reference_x0 or defer_kl:
                asked = (f"kl_to={list(kl_to)}" if kl_to else "return_reference_x0=True" if return_reference_x0
                         else "defer_kl=True")
                raise UserError(f"{asked} is measured along with the path KL: pass return_kl=True as well")
            return None
        if defer_kl and return_reference_x0:
            raise UserError("return_reference_x0=True keeps the base's x0 estimates as the images are sampled; it "
                            "cannot wait for defer_kl=True: leave one of them out")
        unknown = [name for name in kl_to if name not in self.comparison_adapters]
        if unknown:
            raise UserError(f"kl_to names {unknown}, which are not loaded comparison adapters "
                            f"({sorted(self.comparison_adapters)}); load them with load_comparison_adapters")
        targets = (BASE, *kl_to)
        if not fusion.gaussian:
            return PathKL.undefined(targets, batch)
        return PathKL.zeros(targets, batch, keeps_reference_x0=return_reference_x0, defers=defer_kl)


_FUSING_CLASSES: dict[str, type] = {}


def fusing_class(family: ModelFamily) -> type:
    """The fusing pipeline of ``family``: its stock pipeline class with ``_Fusing`` mixed in, made once."""
    if family.name not in _FUSING_CLASSES:
        _FUSING_CLASSES[family.name] = type(family.fusing_class_name, (_Fusing, family.pipeline_class),
                                            {"__module__": __name__, "__doc__": family.fusing_doc, "family": family})
    return _FUSING_CLASSES[family.name]


MSDDAPipeline = fusing_class(family_named("StableDiffusionPipeline"))
MSDDA3Pipeline = fusing_class(family_named("StableDiffusion3Pipeline"))
MSDDAFluxPipeline = fusing_class(family_named("FluxPipeline"))
