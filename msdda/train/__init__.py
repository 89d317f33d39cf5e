"""Stage 1: train one LoRA adapter per reward with step-level KL-regularised RL (see msdda.train.trainer).

``TrainConfig`` is imported on first use (PEP 562): its module needs torch, and ``msdda train --help`` should not."""

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from msdda.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(name)


def train(config):
    """Train one adapter as ``config`` (a ``TrainConfig``) says; returns the final adapter folder."""
    from msdda.train.trainer import train as run

    return run(config)
