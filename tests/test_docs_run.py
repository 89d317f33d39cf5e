"""Docs that run: the shell and Python blocks of README.md and docs/*.md marked runnable run as written, so a
guide cannot drift from the code.

A block is marked by an HTML comment on the line before its fence (GitHub does not show it):

- ``<!-- runnable -->`` runs the block (```` ```bash ```` with ``bash -e``, ```` ```python ```` with Python);
- ``<!-- runnable slow -->`` runs it in the slow tier only (it takes minutes: write the short overrides that make
  it run in the command itself, as a reader would type them);
- ``<!-- runnable save NAME -->`` writes the block to the file NAME, as a guide that says "save this as NAME" means.

The blocks of one document run in order in one temporary folder that stands for a fresh clone's root: it holds
links to the repository's ``configs/`` and ``launch/``, and ``msdda`` and ``python`` on the PATH run this checkout's
msdda. What the blocks write (``runs/``, a cache) stays in that folder.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
MARKED = re.compile(r"^<!-- runnable(?: (?P<option>slow|save (?P<name>[\w./-]+)))? -->\n"
                    r"```(?P<language>\w*)\n(?P<code>.*?)^```$", re.DOTALL | re.MULTILINE)


@dataclass
class Block:
    language: str
    code: str
    slow: bool
    save_as: str | None


def runnable_blocks(path: Path) -> list[Block]:
    """The blocks ``path`` marks runnable, in order; a marker not followed by a bash or python fence is an error."""
    text = path.read_text()
    blocks = [Block(m["language"], m["code"], m["option"] == "slow", m["name"]) for m in MARKED.finditer(text)]
    markers = len(re.findall(r"^<!-- runnable", text, re.MULTILINE))
    assert markers == len(blocks), f"{path.name}: {markers - len(blocks)} runnable markers are not right before a fence"
    for block in blocks:
        assert block.save_as or block.language in ("bash", "python"), f"{path.name}: cannot run {block.language!r}"
    return blocks


def _documents() -> list:
    cases = []
    for path in DOCS:
        blocks = runnable_blocks(path)
        if blocks:
            marks = [pytest.mark.slow] if any(block.slow for block in blocks) else []
            cases.append(pytest.param(path, id=str(path.relative_to(ROOT)), marks=marks))
    return cases


def _fresh_clone(folder: Path) -> dict[str, str]:
    """A folder standing for a clone's root, and the environment in which its ``msdda`` and ``python`` are ours."""
    for name in ("configs", "launch"):
        (folder / name).symlink_to(ROOT / name)
    bin_folder = folder / ".bin"
    bin_folder.mkdir()
    for name, module in (("msdda", "-m msdda.cli "), ("python", "")):
        # this checkout after whatever PYTHONPATH a block exports (e.g. the folder, for a user's reward module)
        script = bin_folder / name
        script.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{ROOT}" exec {sys.executable} '
                          f'{module}"$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": "",
            "MSDDA_CACHE": str(folder / ".cache"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("path", _documents())
def test_runnable_blocks_run_as_written(path: Path, tmp_path: Path) -> None:
    environment = _fresh_clone(tmp_path)
    for index, block in enumerate(runnable_blocks(path)):
        if block.save_as:
            (tmp_path / block.save_as).write_text(block.code)
            continue
        command = ["bash", "-e", "-c", block.code] if block.language == "bash" else ["python", "-c", block.code]
        result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True,
                                timeout=1800)  # a guard against a hang: on a loaded machine a fast block takes minutes
        assert result.returncode == 0, (f"{path.name}, runnable block {index + 1} failed:\n{block.code}\n"
                                        f"{result.stderr[-3000:]}")


def test_a_marker_away_from_a_fence_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- runnable -->\n\n```bash\necho hi\n```\nMark with `<!-- runnable -->`.\n")
    with pytest.raises(AssertionError, match="not right before a fence"):
        runnable_blocks(page)
    page.write_text("<!-- runnable save x.py -->\n```python\nx = 1\n```\n<!-- runnable slow -->\n```bash\necho\n```\n")
    assert [(b.save_as, b.slow, b.language) for b in runnable_blocks(page)] == [("x.py", False, "python"),
                                                                                (None, True, "bash")]
