"""The README's quick start runs as written, and the commands it documents exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    nxt = text.find("\n## ", start + 3)
    return text[start: nxt if nxt > 0 else len(text)]


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", _section("Quick start"), flags=re.S)
    assert len(blocks) == 1
    res = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "mars_organism" / "mars.json").is_file()  # the fitted MARS it saved
    assert "I cannot help with that ." in res.stdout  # and the steering it printed


def test_documented_commands_exist():
    from analysis.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for cmd in re.findall(r"^mars (\w+)", _section("Command line"), flags=re.M):
        assert cmd in sub.choices, cmd
