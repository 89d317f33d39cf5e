"""The state-replay training mode in the trainer, the gauge it records, and what fusion and reports make of it."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from msdda.adapters import METADATA_FILE, load_adapter_metadata, shipped_adapters
from msdda.config import load_config
from msdda.errors import UserError
from msdda.fuse.optimality import far_from_optimum
from msdda.kernels import StepKernel
from msdda.report.optimality import gauge_rows, recorded_gauges
from msdda.train import TrainConfig
from msdda.step_scales import registered_step_scales
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
REPLAY = ["epochs=1", "sampling.num_inference_steps=4", "sampling.batch_size=4", "sampling.batches_per_epoch=2",
          "train.batch_size=4", "sample_every=0", "log_with=null", "checkpoint.every=1", "train.fresh_noise=true",
          "train.reference_states=0.5", "train.inner_epochs=2", "train.gauge_prompts=2"]


def _config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml",
                       [*REPLAY, f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.estimator=policy-gradient"], "train.fresh_noise draws new action noise for the pathwise update"),
    (["train.fresh_noise=false"], "train.reference_states=0.5 must be in [0, 1], and above 0 only with"),
    (["train.reference_states=1.5"], "train.reference_states=1.5 must be in [0, 1]"),
    (["train.gauge_draws=1"], "train.gauge_draws must be at least 2"),
    (["train.stop_near_optimum=0.1"], "needs a tolerance > 0 and gauges to read: set train.gauge_every >= 1"),
    (["train.lr_warmup_steps=-1"], "train.lr_warmup_steps must be at least 0, got -1"),
    (["train.step_scale_rounds=1", "train.gauge_prompts=0"], "fits the per-step scales on the gauge's prompts"),
])
def test_replay_settings_are_refused_with_the_fix(tmp_path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _config(tmp_path, *overrides).validate()


def test_stopping_near_the_optimum_is_refused_for_a_reward_without_gradients(tmp_path) -> None:
    config = _config(tmp_path, "train.fresh_noise=false", "train.reference_states=0", "train.estimator=policy-gradient",
                     "reward.name=jpeg-compressibility", "reward.step_reward=terminal", "train.gauge_every=1",
                     "train.stop_near_optimum=0.1")
    with pytest.raises(UserError, match="'jpeg-compressibility' is not differentiable: unset train.stop_near_optimum"):
        Trainer(config)


def test_state_replay_samples_reference_states_and_records_the_gauge_in_the_adapter(tmp_path) -> None:
    """The first half of the epoch's batches comes from the reference (its recorded log-probs are the reference
    kernel's), the second from the adapter; the adapter is switched back on after; the final adapter carries its
    gauge (both sources, every stochastic step) in its metadata and model card, and the per-step scales fitted after
    the last epoch (``train.step_scale_rounds``), which the gauge recorded is of."""
    trainer = Trainer(_config(tmp_path, "train.step_scale_rounds=1"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so that its kernels differ from the reference's
        for parameter in trainer.policy.lora_parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.03)
    trajectories = trainer.sample(0)
    assert trajectories.noises is None  # fresh noise: the rollout's draws are not kept
    reference = StepKernel(trajectories.reference_means, trajectories.reference_variances)
    reference_log_probs = torch.stack([
        StepKernel(reference.mean[:, t], reference.variance[:, t]).log_prob(trajectories.latents[:, t + 1])
        for t in range(len(trajectories.timesteps))], dim=1)
    assert torch.allclose(reference_log_probs[:4], trajectories.log_probs[:4], rtol=1e-5, atol=1e-3)
    assert not torch.allclose(reference_log_probs[4:], trajectories.log_probs[4:], rtol=1e-3, atol=1e-1)
    assert all(parameter.requires_grad for parameter in trainer.policy.lora_parameters)

    final = trainer.run()
    gauge = load_adapter_metadata(final).optimality
    assert set(gauge["sources"]) == {"reference", "adapter"}
    assert [row["step"] for row in gauge["sources"]["adapter"]] == [0, 1, 2, 3]
    assert gauge["beta"] == trainer.config.beta and gauge["prompts"] == 2 and gauge["draws"] == 2
    assert all(row["ratio"] is not None and row["ratio"] > 0 for row in gauge["sources"]["adapter"])
    card = (final / "README.md").read_text()
    assert "## Distance from the step optimum" in card and "## Per-step scales" in card
    scales = load_adapter_metadata(final).step_scales
    assert [entry["step"] for entry in scales] == [0, 1, 2, 3]
    assert [entry["timestep"] for entry in scales] == [row["timestep"] for row in gauge["sources"]["adapter"]]
    assert all(entry["scale"] >= 0 for entry in scales) and any(entry["scale"] not in (0.0, 1.0) for entry in scales)
    for entry, row in zip(scales, gauge["sources"]["adapter"]):  # the gauge recorded is of the adapter at its scales
        assert (row["kl"] == 0) == (entry["scale"] == 0)
    assert registered_step_scales(trainer.unwrapped) == {}  # fitted, recorded, and not left on the trained denoiser


def _adapter_with_gauge(tmp_path: Path, worst: float | None, implied: float | None) -> Path:
    folder = tmp_path / f"adapter_{worst}"
    shutil.copytree(shipped_adapters()["world:aesthetic"], folder)
    data = json.loads((folder / METADATA_FILE).read_text())
    rows = [{"step": 0, "ratio": 0.35, "cosine": 0.5}, {"step": 1, "ratio": None, "cosine": None}]
    data["optimality"] = {"beta": data["beta"], "implied_beta": implied, "max_ratio_deviation": worst,
                          "sources": {"reference": rows, "adapter": rows}}
    (folder / METADATA_FILE).write_text(json.dumps(data))
    return folder


def test_fusion_warns_once_in_one_line_about_adapters_far_from_their_optimum(tmp_path) -> None:
    from msdda.fuse import MSDDAPipeline

    far, near = _adapter_with_gauge(tmp_path, 0.65, 0.009), _adapter_with_gauge(tmp_path, 0.05, 0.00105)
    assert far_from_optimum(load_adapter_metadata(far)) and not far_from_optimum(load_adapter_metadata(near))
    assert not far_from_optimum(load_adapter_metadata(shipped_adapters()["world:thirds"]))  # nothing recorded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MSDDAPipeline.from_pretrained("world", adapters=[str(far), str(near)])
    messages = [str(w.message) for w in caught if "step optimum" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert str(far) in messages[0] and str(near) not in messages[0]
    assert "beta 0.001, implied 0.009, worst step off by 65%" in messages[0] and "--betas" in messages[0]


def test_the_warning_reads_the_scale_condition_where_the_gauge_has_it(tmp_path) -> None:
    """A LoRA at its restricted optimum (each step's shift at its best multiple) is not far from its optimum however
    far its pointwise ratio is, and one whose steps are off their best multiple is."""
    folder = _adapter_with_gauge(tmp_path, 0.75, 0.012)
    data = json.loads((folder / METADATA_FILE).read_text())
    data["optimality"]["max_scale_deviation"] = 0.2
    (folder / METADATA_FILE).write_text(json.dumps(data))
    assert not far_from_optimum(load_adapter_metadata(folder))
    data["optimality"]["max_scale_deviation"] = 0.9
    (folder / METADATA_FILE).write_text(json.dumps(data))
    assert far_from_optimum(load_adapter_metadata(folder))


def test_the_report_table_reads_each_adapters_recorded_gauge(tmp_path) -> None:
    far = _adapter_with_gauge(tmp_path, 0.65, None)
    gauges = recorded_gauges([str(far), "world:thirds"])
    assert list(gauges) == [str(far)]
    assert gauge_rows(gauges) == [[str(far), "0.001", "none", "0.65", "n/a", "0.35 n/a", "0.50 n/a"]]


def test_evaluate_prints_and_writes_the_gauge_of_the_trained_reward(tmp_path, capsys) -> None:
    """``msdda evaluate`` on a shipped adapter: the gauge of its own reward, per step and source, in
    evaluation.json and on the terminal; the shipped aesthetic adapter reads well short of its optimum."""
    from msdda.cli import main

    assert main(["evaluate", "world:aesthetic", "--num-prompts", "2", "--seeds", "0", "--gauge-prompts", "2",
                 "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "distance from the step optimum at beta 0.001 (tweedie step reward, 2 prompts" in printed
    assert "  step 0 (t=901): reference states: ratio" in printed
    gauge = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["optimality"]
    assert [row["step"] for row in gauge["sources"]["adapter"]] == list(range(10))
    assert gauge["implied_beta"] > 0.003  # about 0.009: a third of the way or less
