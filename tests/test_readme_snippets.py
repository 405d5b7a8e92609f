"""The README's Python snippets (sections "Python API" and "Coming from TRL") run as written, in order, on a
tiny model, so they cannot rot. The test provides `model_dir`; the snippets build everything else."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
SECTIONS = ("## Python API", "## Coming from TRL")


def snippets() -> list[str]:
    """The ```python blocks of SECTIONS, in README order."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for title in SECTIONS:
        start = text.index(f"\n{title}\n")
        end = text.find("\n## ", start + 1)
        blocks += re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)
    return blocks


def test_readme_python_snippets_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    blocks = snippets()
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)  # the snippets write runs/ and pairs.jsonl
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    namespace = {"model_dir": str(tiny_model_dir)}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "128 4 live"  # the TRL batch arithmetic, as the README's comment says
    assert any(line.startswith("tensor([0.598") for line in printed)  # the hand-worked sigmoid loss
    assert namespace["result"].eval_metrics["step"] == namespace["result"].train_metrics["step"] == 2
