"""Prompt sets: lists, text files, tables loaded with datasets, and the Hub when it is unreachable."""

from __future__ import annotations

import pytest

from msdda.prompts import check_prompts_spec, load_prompts


def test_text_files_tables_and_lists(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text("id,Prompts\n1,a red car\n2,a blue bird\n3,a green tree\n")
    assert load_prompts(str(tmp_path / "p.csv")) == ["a red car", "a blue bird", "a green tree"]
    (tmp_path / "q.jsonl").write_text('{"caption": "x", "other": "a"}\n{"caption": "y", "other": "b"}\n')
    assert load_prompts(str(tmp_path / "q.jsonl") + "#other") == ["a", "b"]
    assert load_prompts(["a", " ", "b", "c", "d"], count=2) == ["a", "c"]
    assert len(load_prompts("world", count=16)) == 16
    with pytest.raises(ValueError, match="no prompt column"):
        (tmp_path / "r.csv").write_text("id,label\n1,x\n")
        load_prompts(str(tmp_path / "r.csv"))


def test_missing_files_and_an_unreachable_hub_are_named(tmp_path, offline) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_prompts_spec(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="empty list"):
        check_prompts_spec([" "])
    with pytest.raises(FileNotFoundError, match="give the local file instead"):
        load_prompts("hub:someone/drawbench")
