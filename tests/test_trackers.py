"""Experiment trackers (log_with): wandb in its offline mode beside TensorBoard, read back from the run's files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from msdda.config import load_config
from msdda.train import TrainConfig
from msdda.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _wandb_records(path: Path):
    """The protobuf records of a wandb run file (``run-<id>.wandb``): LevelDB's log format, 32 KiB blocks of
    chunks with a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last), after wandb's 7-byte
    file header. wandb 0.31 reads these files only in its Go core, so the test reads them itself."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(run_dir: Path) -> list[dict]:
    """Each ``wandb.log`` call of the one offline run under ``run_dir``: {key: value}, a logged image's fields under
    'key/field'."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return _wandb_history_of(run_file)


def _wandb_history_of(run_file: Path) -> list[dict]:
    """Each ``wandb.log`` call recorded in the wandb run file ``run_file``."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in _wandb_records(run_file) if record.WhichOneof("record_type") == "history"]


def _tracked_run(tmp_path: Path, monkeypatch, *overrides: str) -> Path:
    """One epoch of the world recipe at toy size logged to wandb (offline, its files all under ``tmp_path``) and
    TensorBoard, with a sample grid; returns the run's logs folder."""
    for variable, folder in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(variable, str(tmp_path / "wandb" / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = ["epochs=1", "sampling.num_inference_steps=4", "sampling.batch_size=4", "sampling.batches_per_epoch=1",
                "train.batch_size=4", "checkpoint.every=1", "sample_every=1", "log_with=[tensorboard, wandb]",
                "train.gauge_prompts=0", f"output_dir={tmp_path / 'run'}", *overrides]
    Trainer(load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml", settings)).run()
    return tmp_path / "run" / "logs"


def test_wandb_offline_beside_tensorboard_gets_losses_kl_rewards_and_sample_grids(tmp_path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = _tracked_run(tmp_path, monkeypatch)
    (epoch,) = _wandb_history(logs)
    assert epoch["_step"] == 1
    for key in ("loss", "policy_loss", "kl", "approx_kl", "clip_fraction", "reward_mean", "reward_std"):
        assert isinstance(epoch[key], (int, float)), key  # JSON: the first epoch's KL is 0
    assert epoch["reward_mean"] > 0 and epoch["loss"] != 0
    assert epoch["samples/_type"] == "images/separated" and epoch["samples/count"] == 1  # one grid of 8 samples
    (image,) = epoch["samples/filenames"]
    run_files = next(logs.glob("wandb/offline-run-*/files"))
    assert (run_files / image).is_file() and (epoch["samples/width"], epoch["samples/height"]) == (1024, 128)

    images = {}
    for events_file in logs.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file), size_guidance={"images": 0})
        events.Reload()
        images.update({tag: events.Images(tag) for tag in events.Tags()["images"]})
    (grid,) = images["samples"]
    assert grid.step == 1 and (grid.width, grid.height) == (1024, 128)


def test_a_resumed_run_logs_on_in_its_wandb_run(tmp_path, monkeypatch) -> None:
    """wandb's run id is kept in the run's logs/: the resumed run's epochs go to the same wandb run (offline, each
    start writes its own folder of that run), and a new run in another folder gets another id."""
    logs = _tracked_run(tmp_path, monkeypatch, "sample_every=0", "log_with=wandb")
    _tracked_run(tmp_path, monkeypatch, "sample_every=0", "log_with=wandb", "epochs=2", "resume=latest")
    run_files = sorted(logs.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and len({path.name for path in run_files}) == 1, run_files
    assert run_files[0].name == f"run-{(logs / 'wandb_run_id').read_text().strip()}.wandb"
    steps = [[entry["_step"] for entry in _wandb_history_of(path)] for path in run_files]
    assert sorted(steps) == [[1], [2]]
    other = _tracked_run(tmp_path / "other", monkeypatch, "sample_every=0", "log_with=wandb")
    assert (other / "wandb_run_id").read_text() != (logs / "wandb_run_id").read_text()

@pytest.mark.slow
def test_wandb_gets_the_optimality_gauge_of_each_gauged_epoch(tmp_path, monkeypatch) -> None:
    """The gauge (train.gauge_every) is what the trainer knows of the distance to the step optimum; wandb logs it
    with the epoch's losses (None for the implied beta where the adapter does not move along the reward's gradient)."""
    logs = _tracked_run(tmp_path, monkeypatch, "train.gauge_every=1", "train.gauge_prompts=1")
    (epoch,) = _wandb_history(logs)
    assert isinstance(epoch["gauge_max_ratio_deviation"], float) and epoch["gauge_max_ratio_deviation"] >= 0
    assert "gauge_implied_beta" in epoch and isinstance(epoch["kl"], (int, float))


def test_an_unknown_tracker_and_a_missing_wandb_are_refused_before_any_work(tmp_path, monkeypatch) -> None:
    import importlib.util

    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['mlflow'\]; use \['tensorboard', 'wandb'\]"):
        Trainer(load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml",
                            ["log_with=[tensorboard, mlflow]", f"output_dir={tmp_path / 'run'}"]))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match="log_with names wandb, which is not installed: pip install wandb"):
        Trainer(load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml",
                            ["log_with=wandb", f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()
