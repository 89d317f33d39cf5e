"""The docs cannot drift: the configuration reference is the generator's output, and every relative link in
README.md and docs/ points at a file (and, with an anchor, at a heading) that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def load_generator():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_matches_the_dataclasses() -> None:
    generator = load_generator()
    assert generator.OUTPUT.read_text() == generator.render(), (
        "docs/configuration.md is out of date: run python scripts/config_reference.py")


def test_configuration_reference_documents_every_field() -> None:
    import dataclasses

    generator = load_generator()
    text = generator.OUTPUT.read_text()
    for _, _, modules, name in generator.CONFIGS:
        for section, cls, _ in generator.tables(generator.find_class(modules, name)):
            prefix = f"{section}." if section else ""
            for item in dataclasses.fields(cls):
                assert f"| `{prefix}{item.name}` |" in text, f"{name}: {prefix}{item.name} missing"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_~]|<[^>]+>", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = counts.get(base, 0)
            counts[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files_and_headings(path: Path) -> None:
    broken = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target} (no heading with anchor #{fragment})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_slug_follows_github() -> None:
    assert slug("Measured (`msdda world evaluate`, seed 0, 20 DDIM steps, eta 1, guidance 3)") == \
        "measured-msdda-world-evaluate-seed-0-20-ddim-steps-eta-1-guidance-3"
    assert slug("Training on the sampling pass (`train.single_pass`)") == "training-on-the-sampling-pass-trainsingle_pass"
    assert slug("`reward.*`") == "reward"
