"""Pretrain the embedded world from scratch: the attribute classifier, the VAE, then UNet + text encoder.

Reproducible from a seed (fixed step counts, seeded data and noise, 2 CPU threads). The result is a folder holding ``pipeline/`` (a stock StableDiffusionPipeline), ``classifier/``
and ``pretraining.json`` (command, seed, settings, measured accuracies and wall time).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from msdda.errors import UserError
from msdda.world.data import (
    Attributes,
    prompt_for,
    render_images,
    sample_attributes,
)
from msdda.world.models import (
    AttributeClassifier,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)

__all__ = ["PretrainConfig", "pretrain_world", "continue_layout"]


@dataclass
class PretrainConfig:
    seed: int = 0
    num_images: int = 24_000
    classifier_steps: int = 900
    classifier_batch: int = 128
    vae_steps: int = 450
    vae_batch: int = 32
    unet_steps: int = 2_000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    layout_steps: int = 0
    """Steps of a second UNet phase that trains on the clean-image (x0) error at high noise only (timesteps >=
    layout_min_timestep), where a sample's layout is decided. Epsilon prediction's loss barely weighs those
    steps, and without this phase the UNet ignores the position words (docs/training.md). 0: the shipped world."""
    layout_min_timestep: int = 600
    layout_lr: float = 2e-4
    threads: int = 2


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def _labels(attributes: list[Attributes]) -> torch.Tensor:
    return torch.tensor([a.indices for a in attributes])


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, config: PretrainConfig) -> AttributeClassifier:
    """Cross-entropy on the three attributes, with pixel noise and brightness jitter so it reads samples too."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    model = AttributeClassifier()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in tqdm(range(config.classifier_steps), desc="classifier", mininterval=2):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, config.classifier_steps, 2e-3)
        index = torch.randint(0, len(images), (config.classifier_batch,), generator=generator)
        batch = images[index]
        noise_level = torch.rand(len(batch), 1, 1, 1, generator=generator) * 0.1
        gain = 1 + (torch.rand(len(batch), 1, 1, 1, generator=generator) - 0.5) * 0.2
        batch = (batch * gain + noise_level * torch.randn(batch.shape, generator=generator)).clamp(0, 1)
        logits = model(batch)
        loss = sum(F.cross_entropy(logit, labels[index, i]) for i, logit in enumerate(logits))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: AttributeClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predictions = [torch.cat([logit.argmax(-1) for logit in (model(chunk)[i] for chunk in images.split(512))])
                   for i in range(3)]
    return {name: float((pred == labels[:, i]).float().mean())
            for i, (name, pred) in enumerate(zip(("colour", "shape", "position"), predictions))}


def train_vae(images: torch.Tensor, config: PretrainConfig):
    generator = torch.Generator().manual_seed(config.seed + 2)
    vae = build_vae()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in tqdm(range(config.vae_steps), desc="vae", mininterval=2):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, config.vae_steps, 1e-3)
        index = torch.randint(0, len(images), (config.vae_batch,), generator=generator)
        target = images[index] * 2 - 1
        posterior = vae.encode(target).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.l1_loss(reconstruction, target) + F.mse_loss(reconstruction, target) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return vae.eval()


def descend(loss: torch.Tensor, optimiser: torch.optim.Optimizer, parameters: list, emas: list) -> None:
    """One clipped optimiser step, then each (EMA, module) pair's EMA step."""
    optimiser.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimiser.step()
    for ema, module in emas:
        ema.step(module.parameters())


def noised_batch(latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor, noise_scheduler,
                  generator: torch.Generator, config: PretrainConfig, min_timestep: int = 0,
                  timestep_choices: torch.Tensor | None = None):
    """One training batch: (clean latents, prompt ids with CFG dropout, noise, timesteps >= min_timestep (or drawn
    uniformly from ``timestep_choices``), noisy latents), every draw from ``generator`` in a fixed order."""
    index = torch.randint(0, len(latents), (config.unet_batch,), generator=generator)
    ids = token_ids[index].clone()
    ids[torch.rand(len(ids), generator=generator) < config.prompt_dropout] = empty_ids
    clean = latents[index]
    noise = torch.randn(clean.shape, generator=generator)
    if timestep_choices is None:
        timesteps = torch.randint(min_timestep, noise_scheduler.config.num_train_timesteps, (len(ids),),
                                  generator=generator)
    else:
        timesteps = timestep_choices[torch.randint(0, len(timestep_choices), (len(ids),), generator=generator)]
    return clean, ids, noise, timesteps, noise_scheduler.add_noise(clean, noise, timesteps)


def _vae_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior means of ``images`` (in [0, 1]), unscaled: the world's latents before its scaling factor."""
    with torch.no_grad():
        return torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(256)])


def _prompt_ids(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids of ``prompts``, token ids of the empty prompt that classifier-free guidance trains on)."""
    token_ids = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    return token_ids[:-1], token_ids[-1]


def layout_loss(unet, embeds: torch.Tensor, clean: torch.Tensor, timesteps: torch.Tensor, noisy: torch.Tensor,
                alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The layout phase's loss: the error of the x0 the epsilon-predicting ``unet`` implies at ``noisy``."""
    alpha_prod = alphas_cumprod[timesteps][:, None, None, None]
    epsilon = unet(noisy, timesteps, embeds).sample
    return F.mse_loss((noisy - (1 - alpha_prod).sqrt() * epsilon) / alpha_prod.sqrt(), clean)


class Seeded(Protocol):
    """Settings a reproducible phase needs: ``PretrainConfig`` and the continuations' configs."""

    seed: int
    threads: int


@contextmanager
def reproducible(config: Seeded) -> Iterator[None]:
    """Seed, thread count and deterministic algorithms for bit-identical weights from one seed; the process's
    deterministic-algorithms setting is restored afterwards, also when training fails."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # bit-identical weights from one seed, whatever the threading
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)


def layout_data(pipeline, config: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scaled latents, prompt token ids, empty-prompt ids) of pretraining's images, encoded by a saved world's VAE
    and tokenizer: the layout phase's inputs, as ``pretrain_world`` has them in memory."""
    attributes = sample_attributes(config.num_images, config.seed, "train")
    moments = _vae_moments(pipeline.vae, _to_tensor(render_images(attributes, config.seed + 100)))
    token_ids, empty_ids = _prompt_ids(pipeline.tokenizer, [prompt_for(a) for a in attributes])
    return moments * pipeline.vae.config.scaling_factor, token_ids, empty_ids


def train_unet(latents: torch.Tensor, prompts: list[str], tokenizer, config: PretrainConfig):
    """Epsilon-prediction training of UNet and text encoder together, prompts dropped for CFG, EMA kept; then the
    layout phase, if ``config.layout_steps``."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    generator = torch.Generator().manual_seed(config.seed + 3)
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer))
    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    token_ids, empty_ids = _prompt_ids(tokenizer, prompts)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=1e-4)
    ema_unet = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    ema_text = EMAModel(text_encoder.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    progress = tqdm(range(config.unet_steps), desc="unet", mininterval=2)
    for step in progress:
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, config.unet_steps, config.unet_lr)
        _, ids, noise, timesteps, noisy = noised_batch(latents, token_ids, empty_ids, noise_scheduler, generator,
                                                        config)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        descend(loss, optimiser, parameters, [(ema_unet, unet), (ema_text, text_encoder)])
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    if config.layout_steps:
        _train_layout(unet, text_encoder, latents, token_ids, empty_ids, noise_scheduler, config)
    return unet.eval(), text_encoder.eval()


def _train_layout(unet, text_encoder, latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor,
                  noise_scheduler, config: PretrainConfig) -> None:
    """The layout phase (``PretrainConfig.layout_steps``): the x0 error at high noise, from the EMA weights."""
    from diffusers.training_utils import EMAModel

    generator = torch.Generator().manual_seed(config.seed + 5)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=config.layout_lr, weight_decay=1e-4)
    ema_unet = EMAModel(unet.parameters(), decay=config.ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=config.ema_decay)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    for _ in tqdm(range(config.layout_steps), desc="unet layout", mininterval=2):
        clean, ids, _, timesteps, noisy = noised_batch(latents, token_ids, empty_ids, noise_scheduler, generator,
                                                        config, min_timestep=config.layout_min_timestep)
        loss = layout_loss(unet, text_encoder(ids)[0], clean, timesteps, noisy, alphas_cumprod)
        descend(loss, optimiser, parameters, [(ema_unet, unet), (ema_text, text_encoder)])
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())


def pretrain_world(output_dir: str | Path, config: PretrainConfig | None = None) -> Path:
    """Train every part of the world and write ``output_dir/{pipeline,classifier,pretraining.json}``."""
    config = config or PretrainConfig()
    output_dir = Path(output_dir)
    started = time.time()
    with reproducible(config):
        attributes = sample_attributes(config.num_images, config.seed, "train")
        images = _to_tensor(render_images(attributes, config.seed + 100))
        labels = _labels(attributes)
        test_attributes = sample_attributes(2_000, config.seed + 7, "all")
        test_images = _to_tensor(render_images(test_attributes, config.seed + 200))
        test_labels = _labels(test_attributes)

        classifier = train_classifier(images, labels, config)
        classifier_test_accuracy = classifier_accuracy(classifier, test_images, test_labels)
        tqdm.write(f"classifier accuracy on held-out procedural images: {classifier_test_accuracy}")
        classifier.save(output_dir / "classifier")

        vae = train_vae(images, config)
        moments = _vae_moments(vae, images)
        with torch.no_grad():
            scaling_factor = float(1 / moments.std())
            reconstruction = vae.decode(moments[:512]).sample
            vae_error = float((reconstruction.clamp(-1, 1) - (images[:512] * 2 - 1)).abs().mean() / 2)
        vae.register_to_config(scaling_factor=scaling_factor)
        tqdm.write(f"vae: scaling factor {scaling_factor:.4f}, mean abs reconstruction error {vae_error:.4f} (of 1)")

        tokenizer = build_tokenizer()
        unet, text_encoder = train_unet(moments * scaling_factor, [prompt_for(a) for a in attributes], tokenizer,
                                        config)

        assemble_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(output_dir / "pipeline",
                                                                              safe_serialization=True)
        write_record(output_dir, "pretrain_world()", config, started,
                      classifier_test_accuracy=classifier_test_accuracy, vae_scaling_factor=scaling_factor,
                      vae_mean_abs_error=vae_error)
    return output_dir


def continue_layout(world_dir: str | Path, output_dir: str | Path, layout_steps: int) -> Path:
    """Run only the layout phase on a world pretrained without it, with that world's seed and settings, and write
    the result as a new world: the same weights as ``pretrain_world`` with ``layout_steps`` gives, in a fifth of
    the time, which makes trying step counts cheap. The classifier is copied; the record nests the original's."""
    import shutil

    from diffusers import DDPMScheduler

    world_dir, output_dir = Path(world_dir), Path(output_dir)
    if not (world_dir / "pretraining.json").is_file():
        raise UserError(f"{world_dir} holds no pretraining.json; give a folder written by msdda world pretrain")
    earlier = json.loads((world_dir / "pretraining.json").read_text())
    if earlier["config"].get("layout_steps"):
        raise UserError(f"{world_dir} already had {earlier['config']['layout_steps']} layout steps; continue from a "
                         "world pretrained without the layout phase (--layout-steps 0)")
    if layout_steps < 1:
        raise UserError(f"layout_steps must be 1 or more to continue a world, got {layout_steps}")
    known = {f.name for f in fields(PretrainConfig)}
    settings = {k: v for k, v in earlier["config"].items() if k in known and k != "layout_steps"}
    config = PretrainConfig(**settings, layout_steps=layout_steps)
    started = time.time()
    pipeline = load_world_pipeline(world_dir / "pipeline")  # before seeding: building the parts draws random numbers
    with reproducible(config):
        unet, text_encoder = pipeline.unet.train(), pipeline.text_encoder.train()
        _train_layout(unet, text_encoder, *layout_data(pipeline, config),
                      DDPMScheduler.from_config(build_scheduler().config), config)
        unet.eval()
        text_encoder.eval()
    pipeline.save_pretrained(output_dir / "pipeline", safe_serialization=True)
    shutil.copytree(world_dir / "classifier", output_dir / "classifier", dirs_exist_ok=True)
    unchanged = {k: earlier[k] for k in ("classifier_test_accuracy", "vae_scaling_factor", "vae_mean_abs_error")
                 if k in earlier}  # the classifier and the VAE are the earlier world's
    write_record(output_dir, "continue_layout()", config, started, **unchanged, continued_from=earlier)
    return output_dir


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    """The world's stock StableDiffusionPipeline around its trained parts (no safety checker); ``scheduler``
    defaults to the world's DDIM schedule."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler or build_scheduler(), safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)


def load_world_pipeline(pipeline_dir: Path):
    """A saved world's pipeline: its weights in parts built here, so that saving it again writes the configs
    ``pretrain_world`` writes (``from_pretrained`` would add its load path and the tokenizer's defaults to them)."""
    from safetensors.torch import load_file

    tokenizer, vae, unet = build_tokenizer(), build_vae(), build_unet()
    text_encoder = build_text_encoder(len(tokenizer))
    vae.register_to_config(scaling_factor=json.loads((pipeline_dir / "vae" / "config.json").read_text())[
        "scaling_factor"])
    for module, weights in ((vae, "vae/diffusion_pytorch_model.safetensors"),
                            (unet, "unet/diffusion_pytorch_model.safetensors"),
                            (text_encoder, "text_encoder/model.safetensors")):
        module.load_state_dict(load_file(pipeline_dir / weights))
    return assemble_pipeline(vae.eval(), text_encoder.eval(), tokenizer, unet.eval())


CONTINUED_SETTINGS = ("seed", "num_images", "threads")
"""The settings a continuation (learned-variance or flow world) takes from the world it continues."""
RECORD_FROM_EARLIER = ("classifier_test_accuracy", "vae_scaling_factor", "vae_mean_abs_error")
"""What a continuation's record repeats from the earlier world's: its classifier and VAE are that world's."""


def continued_settings(earlier: dict) -> dict:
    """The :data:`CONTINUED_SETTINGS` of the continued world's record ``earlier``."""
    return {k: v for k, v in earlier["config"].items() if k in CONTINUED_SETTINGS}


def repeated_measurements(earlier: dict) -> dict:
    """The :data:`RECORD_FROM_EARLIER` of the continued world's record ``earlier``, for the continuation's record."""
    return {k: earlier[k] for k in RECORD_FROM_EARLIER if k in earlier}


def continued_record(world_dir: Path, flag: str, steps: int) -> dict:
    """The ``pretraining.json`` of ``world_dir``, which a continuation of ``steps`` steps (its CLI flag ``flag``)
    continues; refused where ``world_dir`` has none, is itself a learned-variance or flow world, or ``steps`` < 1."""
    if not (world_dir / "pretraining.json").is_file():
        raise UserError(f"{world_dir} holds no pretraining.json; give a folder written by msdda world pretrain "
                        "(the shipped world is msdda/world/assets)")
    earlier = json.loads((world_dir / "pretraining.json").read_text())
    for key, kind in (("learned_variance_bound_bits_per_dim", "learned-variance"), ("flow", "flow")):
        if earlier.get(key):
            raise UserError(f"{world_dir} is already a {kind} world; continue the fixed-variance UNet world it was "
                            "made from")
    if steps < 1:
        raise UserError(f"steps ({flag}) must be 1 or more, got {steps}")
    return earlier


def write_record(output_dir: Path, call: str, config: Seeded, started: float, **measured) -> None:
    """``pretraining.json``: the command (or library call), config (a dataclass), torch version, wall time and
    ``measured``."""
    record = {
        "command": " ".join(["msdda", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("msdda") else call,
        "config": asdict(config),
        "torch": torch.__version__,
        "wall_seconds": round(time.time() - started, 1),
        **measured,
    }
    (output_dir / "pretraining.json").write_text(json.dumps(record, indent=2))
