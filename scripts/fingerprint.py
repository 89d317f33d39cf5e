"""Hashes of tiny training runs and fused samples on every family, to show that a refactor changes nothing for
users: run it on two checkouts and diff the two JSON files.

    git archive <commit> msdda configs | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before .venv/bin/python scripts/fingerprint.py /tmp/before before.json /tmp/work-before
    PYTHONPATH=$PWD .venv/bin/python scripts/fingerprint.py . after.json /tmp/work-after
    diff before.json after.json

Per base (world, world-lv, world-flow, and tiny random SD, SD3 and FLUX built offline): two adapters trained for one
epoch (the pathwise and the policy-gradient estimator; their LoRA tensors hashed), then samples of msdda,
output-average, soup, diffusion-blend and base at weights (0.6, 0.4) with their path KLs to the base (hashed). About
a minute on 2 CPU cores; on one thread, so that the hashes do not depend on the machine's thread count.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch

from safetensors.torch import load_file

from msdda.config import load_config
from msdda.fuse.pipeline import MSDDAPipeline
from msdda.testing import tiny_clip, tiny_flux, tiny_stable_diffusion, tiny_stable_diffusion_3
from msdda.train import TrainConfig, train

ROOT = Path(sys.argv[1])
OUT = Path(sys.argv[2])
WORK = Path(sys.argv[3])
torch.set_num_threads(1)

TINY = ["epochs=1", "sampling.num_inference_steps=4", "sampling.batch_size=4", "sampling.batches_per_epoch=1",
        "train.batch_size=4", "sample_every=0", "log_with=null", "checkpoint.every=1"]
PROMPTS = ["a photo of a cat", "a red car", "a blue bird on a tree"]
results: dict[str, str] = {}


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def adapter_hash(folder: Path) -> str:
    state = load_file(folder / "pytorch_lora_weights.safetensors")
    return digest(*[state[k] for k in sorted(state)])


def fuse(name: str, base: str, finals: list[Path], prompts: list[str], call: dict) -> None:
    """Record the hash of each method's samples and path KLs at weights (0.6, 0.4)."""
    pipeline = MSDDAPipeline.from_pretrained(base, adapters=[str(f) for f in finals])
    for method in ("msdda", "output-average", "soup", "diffusion-blend", "base"):
        output = pipeline(prompts, weights=[0.6, 0.4], method=method, output_type="pt", return_kl=True,
                          generator=torch.Generator().manual_seed(5), **call)
        results[f"{name}/fuse/{method}"] = digest(output.images, output.kl_to_base)
        print(name, method, results[f"{name}/fuse/{method}"], flush=True)


worlds = {"world": ("world_aesthetic", "world_thirds"), "world-lv": ("world_lv_aesthetic", "world_lv_thirds"),
          "world-flow": ("world_flow_aesthetic", "world_flow_thirds")}
for base, recipes in worlds.items():
    finals = []
    for recipe, extra in zip(recipes, ([], ["train.estimator=policy-gradient", "train.inner_epochs=2",
                                            "train.batch_size=2"])):
        config = load_config(TrainConfig, ROOT / f"configs/train/{recipe}.yaml",
                             [*TINY, *extra, f"output_dir={WORK / recipe}"])
        final = train(config)
        results[f"{base}/train/{recipe}"] = adapter_hash(final)
        print(base, recipe, results[f"{base}/train/{recipe}"], flush=True)
        finals.append(final)
    fuse(base, base, finals, ["a red circle at the top left", "a blue square in the centre"],
         dict(num_inference_steps=4))

# tiny random SD, SD3 and FLUX, trained with CLIP score on a tiny CLIP

clip = str(tiny_clip(WORK / "clip"))
families = {"sd": (tiny_stable_diffusion(WORK / "sd"), "sd15_pickscore", []),
            "sd3": (tiny_stable_diffusion_3(WORK / "sd3"), "sd35_pickscore", []),
            "flux": (tiny_flux(WORK / "flux"), "flux_pickscore", ["sampling.resolution=16"])}
for name, (folder, recipe, extra) in families.items():
    finals = []
    for index, estimator in enumerate(("policy-gradient", "pathwise")):
        config = load_config(TrainConfig, ROOT / f"configs/train/{recipe}.yaml", [
            f"base={folder}", f"prompts={PROMPTS}", f"output_dir={WORK / name / str(index)}", "epochs=1",
            "mixed_precision=no", "sampling.num_inference_steps=3", "sampling.batch_size=2",
            "sampling.batches_per_epoch=1", "train.batch_size=2", "train.gradient_accumulation_steps=1",
            "train.learning_rate=0.01", "sample_every=0", "log_with=null", "checkpoint.every=1", "lora.rank=2",
            "lora.alpha=4", f"train.estimator={estimator}", f"seed={index}", *extra])
        config.reward.name, config.reward.kwargs = "clip-score", {"model": clip}
        final = train(config)
        results[f"{name}/train/{estimator}"] = adapter_hash(final)
        print(name, estimator, results[f"{name}/train/{estimator}"], flush=True)
        finals.append(final)
    call = dict(num_inference_steps=3, **({"height": 16, "width": 16} if name == "flux" else {}))
    fuse(name, str(folder), finals, PROMPTS[:2], call)

OUT.write_text(json.dumps(results, indent=1, sort_keys=True))
print("wrote", OUT)
