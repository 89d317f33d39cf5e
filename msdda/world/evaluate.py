"""Measure the embedded world: does the classifier read the prompt in samples, and do the rewards conflict?

Reported: the classifier's accuracy on procedural test images and on samples (training prompts, and the
held-out attribute combinations), and the conflict between the rewards on samples: the correlation of the
aesthetic and consistency rewards across samples of one prompt, and what selecting the best of 4 samples by one
reward does to the other; likewise for the rule-of-thirds reward against each of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from msdda.diffusion import images_to_pil
from msdda.rewards.world import WorldAesthetic, WorldConsistency, WorldThirds
from msdda.world.data import (
    HELD_OUT,
    Attributes,
    prompt_for,
    render_images,
    sample_attributes,
)
from msdda.utils import image_grid
from msdda.world.sampling import load_pipeline, sampler_arguments

__all__ = ["evaluate_world"]


def _generate(pipeline, prompts: list[str], seed: int, batch: int, **call) -> torch.Tensor:
    images = []
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", mininterval=2):
        generator = torch.Generator().manual_seed(seed + start)
        out = pipeline(prompts[start:start + batch], generator=generator, output_type="pt", **call)
        images.append(out.images.float().cpu())
    return torch.cat(images)


@torch.no_grad()
def _accuracy(classifier, images: torch.Tensor, attributes: list[Attributes]) -> dict[str, float]:
    targets = torch.tensor([a.indices for a in attributes])
    logits = classifier(images)
    correct = [(logit.argmax(-1) == targets[:, i]) for i, logit in enumerate(logits)]
    return {
        "colour": float(correct[0].float().mean()),
        "shape": float(correct[1].float().mean()),
        "position": float(correct[2].float().mean()),
        "all_three": float((correct[0] & correct[1] & correct[2]).float().mean()),
    }


def _selection(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """For each reward and for a random pick, the mean of every reward ``[prompts, samples]`` over the sample of
    each prompt that reward selects as its best."""
    rows = np.arange(len(next(iter(scores.values()))))
    picks = {f"by_{name}": values.argmax(1) for name, values in scores.items()}
    result = {pick: {name: float(values[rows, best].mean()) for name, values in scores.items()}
              for pick, best in picks.items()}
    result["random"] = {name: float(values.mean()) for name, values in scores.items()}
    return result


def evaluate_world(base: str | Path | None = None, num_prompts: int = 64, samples_per_prompt: int = 4,
                   held_out_per_combo: int = 16, seed: int = 0, num_inference_steps: int = 20,
                   guidance_scale: float = 3.0, eta: float = 1.0, grid: str | Path | None = None) -> dict:
    """Sample the world and return the report as a dict (and write a sample grid PNG if ``grid`` is given).

    Samples come from the stock pipeline's ``__call__``: DDIM at ``eta`` for a UNet world, the Euler ODE step for a
    flow world (``eta`` is then unused)."""
    torch.manual_seed(seed)
    pipeline = load_pipeline(base)
    consistency, aesthetic = WorldConsistency(), WorldAesthetic()
    call = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            **sampler_arguments(pipeline, eta)}

    test_attributes = sample_attributes(2_000, seed + 17, "all")
    test_images = torch.from_numpy(render_images(test_attributes, seed + 18)).permute(0, 3, 1, 2).float() / 255

    train_attributes = sample_attributes(num_prompts, seed, "train")
    sample_attributes_list = [a for a in train_attributes for _ in range(samples_per_prompt)]
    prompts = [prompt_for(a) for a in sample_attributes_list]
    images = _generate(pipeline, prompts, seed, 64, **call)

    held_attributes = [Attributes(*combo) for combo in HELD_OUT for _ in range(held_out_per_combo)]
    held_images = _generate(pipeline, [prompt_for(a) for a in held_attributes], seed + 10_000, 64, **call)

    consistency_scores = consistency(images, prompts).numpy()
    aesthetic_scores = aesthetic(images, prompts).numpy()
    thirds_scores = WorldThirds()(images, prompts).numpy()
    by_prompt = lambda scores: scores.reshape(num_prompts, samples_per_prompt)  # noqa: E731
    centred = lambda scores: by_prompt(scores) - by_prompt(scores).mean(1, keepdims=True)  # noqa: E731
    within_prompt_correlation = float(np.corrcoef(centred(consistency_scores).ravel(),
                                                  centred(aesthetic_scores).ravel())[0, 1])
    best_aesthetic = by_prompt(aesthetic_scores).argmax(1)
    best_consistency = by_prompt(consistency_scores).argmax(1)
    rows = np.arange(num_prompts)
    report = {
        "settings": {"num_prompts": num_prompts, "samples_per_prompt": samples_per_prompt,
                     "held_out_per_combo": held_out_per_combo, "seed": seed, **call},
        "classifier_accuracy_procedural_test": _accuracy(consistency.classifier, test_images, test_attributes),
        "classifier_accuracy_samples_train_prompts": _accuracy(consistency.classifier, images, sample_attributes_list),
        "classifier_accuracy_samples_held_out": _accuracy(consistency.classifier, held_images, held_attributes),
        "rewards_on_samples": {
            "consistency_mean": float(consistency_scores.mean()), "consistency_std": float(consistency_scores.std()),
            "aesthetic_mean": float(aesthetic_scores.mean()), "aesthetic_std": float(aesthetic_scores.std()),
            "correlation_across_samples": float(np.corrcoef(consistency_scores, aesthetic_scores)[0, 1]),
            "correlation_within_prompt": within_prompt_correlation,
            "thirds_mean": float(thirds_scores.mean()), "thirds_std": float(thirds_scores.std()),
            **{f"thirds_{name}_correlation_{where}": correlation
               for name, scores in (("aesthetic", aesthetic_scores), ("consistency", consistency_scores))
               for where, correlation in (("across_samples", float(np.corrcoef(thirds_scores, scores)[0, 1])),
                                          ("within_prompt", float(np.corrcoef(centred(thirds_scores).ravel(),
                                                                              centred(scores).ravel())[0, 1])))},
        },
        "selection_best_of_samples": {
            "by_aesthetic": {"aesthetic": float(by_prompt(aesthetic_scores)[rows, best_aesthetic].mean()),
                             "consistency": float(by_prompt(consistency_scores)[rows, best_aesthetic].mean())},
            "by_consistency": {"aesthetic": float(by_prompt(aesthetic_scores)[rows, best_consistency].mean()),
                               "consistency": float(by_prompt(consistency_scores)[rows, best_consistency].mean())},
            "random": {"aesthetic": float(aesthetic_scores.mean()), "consistency": float(consistency_scores.mean())},
        },
        "selection_best_of_samples_with_thirds": _selection(
            {"aesthetic": by_prompt(aesthetic_scores), "consistency": by_prompt(consistency_scores),
             "thirds": by_prompt(thirds_scores)}),
    }
    if grid is not None:
        rows_shown = min(8, num_prompts)
        shown = images[: rows_shown * samples_per_prompt]
        pil_images = images_to_pil(pipeline, shown)
        grid = Path(grid)
        grid.parent.mkdir(parents=True, exist_ok=True)
        image_grid(pil_images, columns=samples_per_prompt).save(grid)
        report["grid"] = {"path": str(grid), "rows": [prompts[i * samples_per_prompt] for i in range(rows_shown)]}
    return report
