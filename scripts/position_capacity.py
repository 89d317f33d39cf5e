"""Can a UNet LoRA with the world recipes' settings learn to follow the prompt's position at all?

Trains the LoRA *supervised* (the layout phase's loss: the x0 error at timesteps 600-999 on the drawn training
images) and reads position and consistency off 128 samples with the attribute classifier every 100 steps. If the
LoRA learns position here but not under RL, the RL signal is what is missing, not the adapter's capacity
(docs/training.md, "Capacity or signal?"). The default base is the shipped world (version 3, which had the
layout phase); ``--base`` names another, e.g. version 2 from git history (docs/world.md, "How the shipped weights
were made"). About 3 minutes per 400 steps on 2 CPU cores.

    git worktree add /tmp/msdda_v2 d9a901a
    .venv/bin/python scripts/position_capacity.py --base /tmp/msdda_v2/msdda/world/assets/pipeline
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    from msdda.rewards.world import WorldConsistency
    from msdda.world import world_path
    from msdda.world.data import prompt_for, sample_attributes
    from msdda.world.evaluate import _accuracy, _generate
    from msdda.world.models import build_scheduler
    from msdda.world.pretrain import PretrainConfig, layout_data, layout_loss, noised_batch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="a world's pipeline folder (default: the shipped world)")
    parser.add_argument("--steps", type=int, default=400, help="supervised LoRA steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    config = PretrainConfig()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    pipeline = StableDiffusionPipeline.from_pretrained(args.base or world_path(), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    latents, token_ids, empty_ids = layout_data(pipeline, config)  # pretraining's images and prompts
    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    text_encoder.eval().requires_grad_(False)

    evaluated = [a for a in sample_attributes(32, 0, "train") for _ in range(4)]
    consistency = WorldConsistency()

    def report(step: int) -> None:
        with torch.no_grad():
            samples = _generate(pipeline, [prompt_for(a) for a in evaluated], 0, 64, num_inference_steps=10,
                                guidance_scale=3.0, eta=1.0)
        accuracy = _accuracy(consistency.classifier, samples, evaluated)
        score = float(consistency(samples, [prompt_for(a) for a in evaluated]).mean())
        print(f"step {step:4d}: position {accuracy['position']:.1%}, colour {accuracy['colour']:.1%}, "
              f"shape {accuracy['shape']:.1%}, consistency (v2) {score:.3f}", flush=True)

    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    optimiser = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.lr)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(config.seed + 5)
    report(0)
    for step in range(1, args.steps + 1):
        clean, ids, _, timesteps, noisy = noised_batch(latents, token_ids, empty_ids, noise_scheduler, generator,
                                                        config, min_timestep=config.layout_min_timestep)
        with torch.no_grad():
            embeds = text_encoder(ids)[0]
        loss = layout_loss(unet, embeds, clean, timesteps, noisy, alphas_cumprod)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            report(step)


if __name__ == "__main__":
    main()
