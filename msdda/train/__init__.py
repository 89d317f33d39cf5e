"""Stage 1: train one LoRA adapter per reward with step-level KL-regularised RL (see msdda.train.trainer)."""

from msdda.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig):
    """Train one adapter as ``config`` says; returns the final adapter folder."""
    from msdda.train.trainer import train as run

    return run(config)
