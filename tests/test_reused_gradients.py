"""Reusing each transition's step-reward gradient over an epoch's updates (``train.reuse_reward_gradients``): the
same gradient as the pathwise update where the gradients were taken, the same optimum (on the analytic world, with a
reward that is not linear), one reward call per transition and epoch."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from msdda.config import load_config
from msdda.errors import UserError
from msdda.train import TrainConfig
from msdda.train.pathwise import linearised_pathwise_loss, pathwise_loss, step_reward_gradients
from msdda.train.trainer import Trainer
from msdda.train.updates import Learner, transitions, update_pass
from tests.test_train import TINY
from tests.test_train_analytic import (
    QUADRATIC_BETA,
    MeanAndVariancePolicy,
    _kernel,
    _sample,
    assert_at_quadratic_optimum,
    quadratic_world,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = [*TINY, "train.reuse_reward_gradients=true", "train.inner_epochs=3"]


def _config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs/train/world_aesthetic.yaml",
                       [*SMALL, f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("overrides", [["train.estimator=policy-gradient", "reward.step_reward=terminal"],
                                       ["train.fresh_noise=true"]])
def test_reused_gradients_are_refused_outside_the_pathwise_update_on_the_rollouts_actions(tmp_path,
                                                                                          overrides) -> None:
    with pytest.raises(UserError, match="train.reuse_reward_gradients linearises the pathwise step reward at the "
                                        "rollout's own actions; got train.estimator="):
        _config(tmp_path, *overrides).validate()


def test_a_negative_proximal_weight_is_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="train.proximal_weight must be a finite number >= 0"):
        _config(tmp_path, "train.proximal_weight=-1").validate()


@pytest.mark.parametrize("step_reward", ["tweedie", "rollout"])
def test_the_linearised_update_has_the_pathwise_gradient_at_the_epochs_policy(tmp_path, step_reward: str) -> None:
    """On the world's UNet with a non-zero LoRA: the gradient of the linearised loss in the adapter's weights, on an
    epoch's states and noise with the reward's gradients taken there, equals the pathwise update's, and the gain it
    reports is 0 there."""
    trainer = Trainer(_config(tmp_path, f"reward.step_reward={step_reward}"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.policy.lora_parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.03)
    trajectories = trainer.sample(0)
    trajectories.reward_gradients = step_reward_gradients(trajectories, trainer.step_reward(), 2)
    assert torch.isfinite(trajectories.reward_gradients).all()
    assert (trajectories.reward_gradients.flatten(2).abs().sum(2) > 0).all()
    advantages = torch.zeros(4, len(trajectories.timesteps))
    for step in (0, 2):
        batch = transitions(trajectories, advantages, torch.arange(4), step)
        gradients = []
        for loss in (lambda: pathwise_loss(trainer.policy_kernel, batch, trainer.config, trainer.step_reward()),
                     lambda: linearised_pathwise_loss(trainer.policy_kernel, batch, trainer.config)):
            trainer.learner.optimizer.zero_grad()
            terms = loss()
            terms.loss.backward()
            gradients.append(torch.cat([p.grad.flatten() for p in trainer.policy.lora_parameters]))
        pathwise, linearised = gradients
        assert float(pathwise.norm()) > 0
        assert torch.allclose(linearised, pathwise, rtol=1e-4, atol=1e-6 * float(pathwise.abs().max())), \
            float((linearised - pathwise).norm() / pathwise.norm())
        assert float(terms.policy_loss) == pytest.approx(0.0, abs=1e-5)


def test_the_trainer_calls_the_reward_once_per_transition_and_epoch(tmp_path, monkeypatch) -> None:
    """Three inner epochs, one gradient pass: each step reward is differentiated once per trained transition of the
    epoch, and the weights move."""
    trainer = Trainer(_config(tmp_path))
    calls = []
    step_reward = trainer.step_reward

    def counted(*args):
        function = step_reward(*args)
        return lambda action, batch: calls.append(len(action)) or function(action, batch)

    monkeypatch.setattr(trainer, "step_reward", counted)
    before = [parameter.detach().clone() for parameter in trainer.policy.lora_parameters]
    trainer.run()
    assert sum(calls) == 4 * 4  # 4 trajectories x 4 steps, once, for 3 inner epochs
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.lora_parameters))


def test_reused_gradients_reach_the_narrower_optimum_of_a_quadratic_reward(fresh_accelerator_state) -> None:
    """The learned-variance world's quadratic reward (tests/test_train_analytic.py), whose optimum N(m*, v*) the
    pathwise update reaches in 150 on-policy epochs: linearised at each epoch's actions the reward is wrong away from
    them, so this mode can reach the optimum only as the fixed point of its epochs, which the proximal term makes
    converge. With a fifth of the reward's gradient evaluations (30 epochs of 10 inner epochs) it reaches the learned
    variance within 6% and the mean within 0.15 of v*'s std at every stochastic step, as the pathwise update does."""
    from accelerate import Accelerator

    world, quadratic = quadratic_world()
    epochs, inner, batch, steps = 30, 10, 512, len(world.timesteps) - 1
    config = TrainConfig(beta=QUADRATIC_BETA)
    config.reward.step_reward, config.train.estimator = "tweedie", "pathwise"
    config.train.reuse_reward_gradients, config.train.inner_epochs = True, inner
    config.train.proximal_weight = 3.0  # 2 c s^2 / beta is 3.5 at the first step: the epochs converge above 1.25
    config.sampling.num_inference_steps, config.train.batch_size = steps, batch
    torch.manual_seed(0)
    policy = MeanAndVariancePolicy(world)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=config.trained_steps)
    policy, optimizer = accelerator.prepare(policy, torch.optim.Adam(policy.parameters(), lr=0.05))
    learner = Learner(accelerator, policy, optimizer, list(policy.parameters()), config.train.max_grad_norm)
    loss = partial(linearised_pathwise_loss, partial(_kernel, world, policy), config=config)

    def step_reward(action: torch.Tensor, transitions_batch) -> torch.Tensor:
        return quadratic(action, transitions_batch.latents, int(transitions_batch.timestep))[0]

    generator = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * (1 - epoch / epochs) + 0.005
        trajectories = _sample(world, policy, quadratic, batch, generator)
        trajectories.reward_gradients = step_reward_gradients(trajectories, step_reward, batch, torch.float64)
        update_pass(loss, trajectories, torch.zeros(batch, steps, dtype=torch.float64), config, learner,
                    seeds=[epoch * inner + i for i in range(inner)], dtype=torch.float64)
    assert_at_quadratic_optimum(world, policy)
