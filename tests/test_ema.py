"""The EMA of the adapter's weights (ema.*): its schedule over optimizer steps, its export, its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msdda.adapters import WEIGHTS_FILE, load_adapter_metadata
from msdda.config import load_config
from msdda.train import TrainConfig
from msdda.train.checkpoint import latest_checkpoint
from msdda.train.config import EmaSettings
from msdda.train.ema import EMA_FILE, build_ema
from msdda.train.trainer import Trainer
from msdda.train.updates import Learner

ROOT = Path(__file__).resolve().parents[1]
TINY = ["sampling.num_inference_steps=4", "sampling.batch_size=4", "sampling.batches_per_epoch=1",
        "train.batch_size=4", "sample_every=0", "log_with=null", "checkpoint.every=1", "train.gauge_prompts=0"]
"""One optimizer step per epoch (one row batch, its four steps accumulated), in a few seconds."""


def _ema_decay(step: int, decay: float, start_step: int) -> float:
    """The decay of the EMA's ``step``-th update (1-based): 0 (a copy of the raw weights) up to one step after
    ``start_step``, then min(decay, (1 + n) / (10 + n)) with n steps since then."""
    n = step - start_step - 1
    return 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))


def test_the_ema_averages_the_raw_weights_of_each_optimizer_step_with_its_documented_decay(
        fresh_accelerator_state) -> None:
    """Ten backwards accumulated in pairs are five optimizer steps, and the EMA takes one update after each, from the
    raw weights of that step: the average in closed form over the recorded raw weights (the ramp (1 + n) / (10 + n),
    capped at the decay from the fourth step on, and the copies before the start)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    settings = EmaSettings(decay=0.2, start_step=1)
    learner = Learner(accelerator, model, optimizer, [model.weight], max_grad_norm=10.0,
                      ema=build_ema([model.weight], settings))
    generator = torch.Generator().manual_seed(0)
    raw = []
    for _ in range(10):
        with accelerator.accumulate(model):
            accelerator.backward((model(torch.randn(4, 3, generator=generator)) ** 2).sum())
            learner.step()
        if accelerator.sync_gradients:
            raw.append(model.weight.detach().clone())
    assert len(raw) == 5 and learner.ema.optimization_step == 5
    expected = raw[0]  # the first update's decay is 0: the EMA starts as the first step's raw weights
    for step, weights in enumerate(raw, start=1):
        decay = _ema_decay(step, settings.decay, settings.start_step)
        expected = decay * expected + (1 - decay) * weights
    assert _ema_decay(4, 0.2, 1) == 0.2 and _ema_decay(3, 0.2, 1) == pytest.approx(2 / 11)
    torch.testing.assert_close(learner.ema.shadow_params[0], expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(expected, raw[-1])


def test_a_run_with_an_ema_exports_the_average_and_the_raw_weights_each_named_in_its_metadata(tmp_path) -> None:
    """Two epochs of one optimizer step each: final/ holds the EMA, d p_1 + (1 - d) p_2 with d = 2/11 of the raw
    weights p_1, p_2 its checkpoints hold, and final-raw/ holds p_2; each adapter says which it is, and each
    checkpoint keeps the EMA for the resume. A checkpoint without the EMA is not resumed by a run that sets one."""
    config = load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml",
                         [*TINY, "epochs=2", "ema.decay=0.5", f"output_dir={tmp_path / 'run'}"])
    Trainer(config).run()
    run = tmp_path / "run"
    first, second = (load_file(run / f"checkpoints/checkpoint-0000{epoch}/adapter" / WEIGHTS_FILE) for epoch in (1, 2))
    averaged, raw = load_file(run / "final" / WEIGHTS_FILE), load_file(run / "final-raw" / WEIGHTS_FILE)
    decay = _ema_decay(2, 0.5, 0)
    assert decay == pytest.approx(2 / 11) and averaged.keys() == raw.keys() == second.keys()
    for key in raw:
        assert torch.equal(raw[key], second[key])
        torch.testing.assert_close(averaged[key], decay * first[key] + (1 - decay) * second[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(averaged[key], raw[key]) for key in raw if "lora_B" in key or "lora.up" in key)
    metadata, raw_metadata = load_adapter_metadata(run / "final"), load_adapter_metadata(run / "final-raw")
    assert (metadata.weights, raw_metadata.weights) == ("ema", "raw")
    assert metadata.training["ema"] == {"decay": 0.5, "start_step": 0} == raw_metadata.training["ema"]
    assert "- weights: ema" in (run / "final" / "README.md").read_text()
    checkpoint = latest_checkpoint(run)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["ema"] == {"optimization_step": 2}
    ema_keys, lora_keys = load_file(checkpoint / EMA_FILE).keys(), load_file(checkpoint / "lora.safetensors").keys()
    assert len(ema_keys) == len(lora_keys) and all("lora_" in key for key in ema_keys)

    (checkpoint / EMA_FILE).unlink()  # as a run without ema.decay writes its checkpoints
    resumed = load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml",
                          [*TINY, "epochs=3", "ema.decay=0.5", "resume=latest", f"output_dir={run}"])
    with pytest.raises(ValueError, match="written without an EMA, and this run sets ema.decay"):
        Trainer(resumed).run()
