"""Write docs/configuration.md from the config dataclasses: every key, its type, its default and its docstring.

    python scripts/config_reference.py           # rewrite docs/configuration.md
    python scripts/config_reference.py --check   # exit 1 if docs/configuration.md is out of date

The docstrings are the string literals that follow a field in its class body (PEP 257's attribute
docstrings), read with ``ast`` from the source. Nested dataclasses (``TrainConfig.sampling`` ...) become their
own tables with dotted keys. tests/test_docs.py checks that the file equals this script's output.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"

# (title, command that reads it, candidate modules in order, class name). The first module that imports and
# holds the class wins, so a dataclass that moves only needs its new module named here.
CONFIGS = [
    ("Training", "msdda train --config <recipe.yaml> [key.sub=value ...]", ["msdda.train.config"], "TrainConfig"),
    ("Fusion", "msdda fuse --config <fuse.yaml> [--flags]", ["msdda.fuse.config", "msdda.fuse.cli"], "FuseConfig"),
    ("Sweeps", "msdda sweep --config <sweep.yaml> [key=value ...]", ["msdda.sweep.config"], "SweepConfig"),
]


def find_class(modules: list[str], name: str) -> type:
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue
            raise
        if hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"none of {modules} defines {name}: update CONFIGS in {Path(__file__).name}")


def class_node(cls: type) -> ast.ClassDef:
    tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node
    raise LookupError(f"class {cls.__name__} not found in {inspect.getsourcefile(cls)}")


def field_sources(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (annotation as written, attribute docstring or '')}, from the class and the dataclasses it
    extends (a field redeclared without a docstring keeps the base class's)."""
    found: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = class_node(klass).body
        for index, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = ""
                following = body[index + 1] if index + 1 < len(body) else None
                if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                        and isinstance(following.value.value, str)):
                    doc = inspect.cleandoc(following.value.value)
                inherited = found.get(node.target.id, ("", ""))[1]
                found[node.target.id] = (ast.unparse(node.annotation), doc or inherited)
    return found


def default_of(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return dataclasses.MISSING


def yaml_literal(value: Any) -> str:
    """The default as one would write it in the YAML file."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_literal(v)}" for k, v in value.items()) + "}"
    return str(value)


def markdown(text: str) -> str:
    """A docstring as one Markdown line: RST's ``code`` as `code`, and < > escaped outside code spans (a bare
    <dataset> would be read as an HTML tag)."""
    parts = " ".join(text.split()).replace("``", "`").split("`")
    for index in range(0, len(parts), 2):
        parts[index] = parts[index].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def tables(cls: type, prefix: str = "") -> list[tuple[str, type, list[str]]]:
    """[(dotted section name, class, table rows)], the class itself first, then its nested dataclasses."""
    sources = field_sources(cls)
    rows, nested = [], []
    for item in dataclasses.fields(cls):
        annotation, doc = sources.get(item.name, (str(item.type), ""))
        default = default_of(item)
        if dataclasses.is_dataclass(default):
            nested.append((item.name, type(default)))
            doc = doc or f"see [`{prefix}{item.name}.*`](#{anchor(prefix + item.name)})"
            rows.append(f"| `{prefix}{item.name}` | `{annotation}` | see below | {cell(markdown(doc))} |")
            continue
        rows.append(f"| `{prefix}{item.name}` | `{cell(annotation)}` | `{cell(yaml_literal(default))}` | {cell(markdown(doc))} |")
    found = [(prefix.rstrip("."), cls, rows)]
    for name, nested_cls in nested:
        found.extend(tables(nested_cls, f"{prefix}{name}."))
    return found


def anchor(section: str) -> str:
    """GitHub's anchor for a heading that reads `<section>.*` (code span)."""
    return "".join(c for c in f"{section}.*".lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from the config dataclasses; do not edit by hand.",
        "     Rewrite it with: python scripts/config_reference.py -->",
        "",
        "Every YAML key that `msdda train`, `msdda fuse` and `msdda sweep` read, with its type, its default and",
        "what it means. Give them in the YAML file or as dotted overrides on the command line",
        "(`msdda train --config configs/train/world_aesthetic.yaml epochs=5 train.learning_rate=1e-3`). An unknown",
        "key is refused with the list of known ones. The shipped recipes in `configs/` override some defaults: see",
        "[training.md](training.md) and [fusion.md](fusion.md).",
        "",
    ]
    for title, command, modules, name in CONFIGS:
        cls = find_class(modules, name)
        lines += [f"## {title} (`{' '.join(command.split()[:2])}`)", "",
                  f"Class `{cls.__module__}.{name}`, read by `{command}`.", ""]
        class_doc = inspect.getdoc(cls)
        if class_doc and not class_doc.startswith(f"{name}("):
            lines += [markdown(class_doc), ""]
        for section, section_cls, rows in tables(cls):
            if section:
                lines += [f"### `{section}.*`", ""]
                doc = inspect.getdoc(section_cls)
                if doc and not doc.startswith(f"{section_cls.__name__}("):
                    lines += [markdown(doc), ""]
                lines += [f"Class `{section_cls.__module__}.{section_cls.__name__}`.", ""]
            lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the dataclasses")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
