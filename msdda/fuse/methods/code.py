"""CoDe: reward-guided best-of-N in blocks, scored with the rewards while sampling."""

from __future__ import annotations

import torch

from msdda.diffusion import BASE
from msdda.errors import UserError
from msdda.fuse.methods.base import FusionContext, FusionMethod, register
from msdda.sampling import denoise


@register
class CoDe(FusionMethod):
    """Every B steps draw N candidate continuations of B base-model steps and keep the one whose one-step
    clean estimate x0_hat at the block's end scores best on the weighted reward sum_i w_i r_i. Its step is a
    selection among samples, not one Gaussian kernel."""

    name = "code"
    label = "code"
    normalises_weights = True
    needs_rewards = True
    gaussian = False

    def sample(self, context: FusionContext, latents: torch.Tensor, timesteps) -> torch.Tensor:
        if context.reward is None or context.decode is None or not context.prompts:
            raise UserError("method 'code' needs the rewards while sampling: pass rewards for every adapter")
        timesteps = list(timesteps)
        for start in range(0, len(timesteps), context.code_block):
            latents = self._block(context, latents, timesteps[start:start + context.code_block])
        return latents

    def _block(self, context: FusionContext, latents: torch.Tensor, block_timesteps: list) -> torch.Tensor:
        batch, candidates = len(latents), context.code_candidates
        states = latents.repeat_interleave(candidates, dim=0)
        positive = context.positive.repeat_interleave(candidates, dim=0)
        negative = context.negative.repeat_interleave(candidates, dim=0) if context.negative is not None else None

        def base_kernel(_index: int, timestep: torch.Tensor, x_t: torch.Tensor):
            return context.kernels(x_t, timestep, [BASE], positive, negative)[0]

        states = denoise(block_timesteps, states, base_kernel, context.generator, context.positive)
        schedule = context.scheduler.timesteps
        if int(block_timesteps[-1]) == int(schedule[-1]):
            clean = states
        else:
            next_index = (schedule == block_timesteps[-1]).nonzero()[0, 0] + 1
            clean = context.kernels(states, schedule[next_index], [BASE], positive, negative)[0].pred_original_sample
        scores = context.reward(context.decode(clean), [p for p in context.prompts for _ in range(candidates)])
        best = scores.reshape(batch, candidates).argmax(dim=1)
        return states.reshape(batch, candidates, *states.shape[1:])[torch.arange(batch), best]
