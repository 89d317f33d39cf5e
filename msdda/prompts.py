"""Prompt sets as configs name them: a list, a text file with one prompt per line, or 'world'."""

from __future__ import annotations

from pathlib import Path

__all__ = ["load_prompts", "check_prompts_spec"]


def check_prompts_spec(spec: list[str] | str, key: str = "prompts") -> None:
    """Refuse a missing file or an empty list before any work."""
    if isinstance(spec, str) and spec != "world" and not Path(spec).is_file():
        raise ValueError(f"{key} file {spec} does not exist; give a text file with one prompt per line, a list of "
                         "prompts, or 'world'")
    if isinstance(spec, list) and not [p for p in spec if p.strip()]:
        raise ValueError(f"{key} is an empty list; give at least one prompt")


def load_prompts(spec: list[str] | str, count: int | None = None) -> list[str]:
    """The prompts ``spec`` names ('world': the embedded world's training prompts); ``count`` keeps that many,
    evenly spaced through the list."""
    if isinstance(spec, list):
        prompts = [p for p in spec if p.strip()]
    elif spec == "world":
        from msdda.world.data import prompt_for, training_combinations

        prompts = [prompt_for(a) for a in training_combinations()]
    else:
        prompts = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts {spec!r} holds no prompts")
    if count is not None and count < len(prompts):
        step = len(prompts) / count
        prompts = [prompts[int(i * step)] for i in range(count)]
    return prompts
