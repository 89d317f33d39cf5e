"""trl 0.23.1's DDPOTrainer on a local StableDiffusionPipeline; prints seconds per epoch as JSON.

Run by benchmarks/train_throughput.py inside the benchmark virtualenv (scripts/setup_bench_env.sh), because
trl's DDPOTrainer is gone from current trl and is no dependency of msdda.
"""

import argparse
import json
import sys
import tempfile
import time

import accelerate
import torch

accelerate.PartialState()  # trl's logger needs it before the pipeline is built

from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--pipeline", required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--batch", type=int, required=True)
parser.add_argument("--batches", type=int, required=True)
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--accumulation", type=int, required=True)
parser.add_argument("--guidance", type=float, required=True)
parser.add_argument("--prompts", required=True, help="JSON list")
parser.add_argument("--msdda-src", required=True, help="folder holding the msdda package, for the reward")
parser.add_argument("--channels-last", action="store_true", help="the UNet in NHWC, as msdda loads it")
parser.add_argument("--compile", action="store_true", help="the UNet through torch.compile, as train.compile does")
args = parser.parse_args()
sys.path.insert(0, args.msdda_src)
from msdda.rewards import load_reward  # noqa: E402  (the same reward code as our trainer)

torch.set_num_threads(2)
prompts = json.loads(args.prompts)
reward = load_reward("world-aesthetic")
generator = torch.Generator().manual_seed(0)


def prompt_function():
    return prompts[int(torch.randint(len(prompts), (1,), generator=generator))], {}


def reward_function(images, batch_prompts, metadata):
    return reward(images.float().clamp(0, 1), list(batch_prompts)), {}


with tempfile.TemporaryDirectory() as logs:
    config = DDPOConfig(
        num_epochs=args.epochs, sample_num_steps=args.steps, sample_eta=1.0, sample_guidance_scale=args.guidance,
        sample_batch_size=args.batch, sample_num_batches_per_epoch=args.batches, train_batch_size=args.batch,
        train_gradient_accumulation_steps=args.accumulation, train_timestep_fraction=1.0, mixed_precision="no",
        log_with=None,
        save_freq=10_000, project_kwargs={"logging_dir": logs, "project_dir": logs}, per_prompt_stat_tracking=False,
        train_learning_rate=3e-4, seed=0)
    pipeline = DefaultDDPOStableDiffusionPipeline(args.pipeline, use_lora=True)
    pipeline.sd_pipeline.set_progress_bar_config(disable=True)
    if args.channels_last:
        pipeline.sd_pipeline.unet.to(memory_format=torch.channels_last)
    if args.compile:  # diffusers' way (pipe.unet = torch.compile(pipe.unet)); trl's sampling and training both run it
        pipeline.sd_pipeline.unet = torch.compile(pipeline.sd_pipeline.unet)
    trainer = DDPOTrainer(config, reward_function, prompt_function, pipeline)
    seconds, global_step = [], 0
    for epoch in range(args.epochs):
        started = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        seconds.append(time.perf_counter() - started)
print(json.dumps({"epoch_seconds": seconds}))
