"""Prompt sets as configs name them.

- a list of prompts;
- ``world``: the embedded world's training prompts;
- a text file, one prompt per line;
- a table file (.csv, .json, .jsonl, .parquet) or ``hub:<dataset id>[@split]`` (e.g.
  ``hub:shunk031/DrawBench@test``), loaded with ``datasets`` (split ``train`` unless named); the prompts are the
  column named after ``#`` (``hub:user/set#caption``), else the first of ``prompt``, ``Prompts``, ``prompts``,
  ``text``, ``caption`` that exists.
"""

from __future__ import annotations

from pathlib import Path

from msdda.errors import InputNotFound, UserError

__all__ = ["load_prompts", "check_prompts_spec"]

TABLE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PROMPT_COLUMNS = ("prompt", "Prompts", "prompts", "text", "caption")
HUB_PREFIX = "hub:"


def check_prompts_spec(spec: list[str] | str, key: str = "prompts") -> None:
    """Refuse a missing file or an empty list before any work."""
    if isinstance(spec, list):
        if not [p for p in spec if p.strip()]:
            raise UserError(f"{key} is an empty list; give at least one prompt")
        return
    if spec == "world" or spec.startswith(HUB_PREFIX):
        return
    path = Path(spec.partition("#")[0])
    if not path.is_file():
        raise UserError(f"{key} {str(path)!r} does not exist; give a text file with one prompt per line, a table "
                         "(.csv/.json/.jsonl/.parquet), 'hub:<dataset id>', a list of prompts, or 'world'")


def _from_dataset(spec: str) -> list[str]:
    import datasets

    source, _, column = spec.partition("#")
    try:
        if source.startswith(HUB_PREFIX):
            name, _, split = source[len(HUB_PREFIX):].partition("@")
            table = datasets.load_dataset(name, split=split or "train")
        else:
            table = datasets.load_dataset(TABLE_FORMATS[Path(source).suffix], data_files=source, split="train")
    except (OSError, ValueError, ConnectionError) as error:  # datasets' offline / not-found errors
        raise InputNotFound(f"cannot load prompts {source!r} ({type(error).__name__}: "
                                f"{str(error).splitlines()[0]}); download the dataset where the Hub is reachable "
                                "and give the local file instead") from error
    columns = [column] if column else [c for c in PROMPT_COLUMNS if c in table.column_names][:1]
    if not columns or columns[0] not in table.column_names:
        raise UserError(f"prompts {spec!r}: no prompt column among {table.column_names}; name it after '#', "
                         f"e.g. {source}#{table.column_names[0]}")
    return [str(p) for p in table[columns[0]]]


def load_prompts(spec: list[str] | str, count: int | None = None) -> list[str]:
    """The prompts ``spec`` names; ``count`` keeps that many, evenly spaced through the list."""
    check_prompts_spec(spec)
    if count is not None and count < 1:
        raise UserError(f"the number of prompts must be 1 or more, got {count}")
    if isinstance(spec, list):
        prompts = spec
    elif spec == "world":
        from msdda.world.data import prompt_for, training_combinations

        prompts = [prompt_for(a) for a in training_combinations()]
    elif spec.startswith(HUB_PREFIX) or Path(spec.partition("#")[0]).suffix in TABLE_FORMATS:
        prompts = _from_dataset(spec)
    else:
        prompts = Path(spec).read_text().splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise UserError(f"prompts {spec!r} holds no prompts; give a file with one prompt per line")
    if count is not None and count < len(prompts):
        step = len(prompts) / count
        prompts = [prompts[int(i * step)] for i in range(count)]
    return prompts
