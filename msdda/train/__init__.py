"""Stage 1: train one LoRA adapter per reward with step-level KL-regularised RL (see msdda.train.trainer).

``TrainConfig`` is imported on first use (PEP 562): its module needs torch, and ``msdda train --help`` should not."""

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from msdda.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(name)


def train(config):
    """Train one adapter as ``config`` (a ``TrainConfig``) says; returns the final adapter folder.

    A resume of a run that has trained all its epochs and exported ``final/`` returns that folder as it is: there is
    nothing left to train, and re-exporting would only rewrite it."""
    from pathlib import Path

    from msdda.train.checkpoint import finished_run

    finished = finished_run(Path(config.output_dir), config.resume, config.epochs)
    if finished is not None:
        return finished[0]
    from msdda.train.trainer import train as run

    return run(config)
