"""The worlds msdda assembles into its cache on first use, as the processes of one launch build them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _build_in_process_group(rank: int, world_size: int, cache: str, init_file: str, built: str) -> None:
    """One process of a gloo group asks for the flow world, as every process of ``accelerate launch`` does; the last
    rank asks first, so that a process other than rank 0 builds it."""
    os.environ["MSDDA_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from msdda.world import flow_world_path

        if rank == world_size - 1:
            Path(built, f"rank{rank}").write_text(str(flow_world_path()))
        dist.barrier()
        if rank != world_size - 1:
            Path(built, f"rank{rank}").write_text(str(flow_world_path()))
    finally:
        dist.destroy_process_group()


def test_the_flow_world_built_under_a_process_group_is_whole_whichever_process_builds_it(tmp_path) -> None:
    """Two processes of one group ask for the flow world; rank 1 builds it (under ``accelerate launch`` whichever takes
    the lock first does). The folder both get holds every component's weights: transformers writes a model's files on
    rank 0 only once torch.distributed is initialised, which left the text encoders empty when rank 1 built it."""
    from diffusers import StableDiffusion3Pipeline

    cache, built = tmp_path / "cache", tmp_path / "built"
    built.mkdir()
    mp.start_processes(_build_in_process_group, args=(2, str(cache), str(tmp_path / "init"), str(built)), nprocs=2,
                       join=True, start_method="spawn")
    folders = {Path((built / f"rank{rank}").read_text()) for rank in range(2)}
    assert len(folders) == 1
    folder = folders.pop()
    for name in ("text_encoder", "text_encoder_2"):
        assert (folder / name / "model.safetensors").is_file() and (folder / name / "config.json").is_file(), name
    pipeline = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert torch.equal(pipeline.text_encoder.get_input_embeddings().weight,
                       pipeline.text_encoder_2.get_input_embeddings().weight)
