"""The `mars` console script."""

import subprocess
import sys

import pytest

import mars_core
from analysis.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mars {mars_core.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "reproduce" in out and "smoke" in out


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-c", "from importlib.metadata import entry_points as e; "
         "print([x.value for x in e(group='console_scripts') if x.name == 'mars'])"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "analysis.cli:main" in out


def test_smoke_runs(capsys):
    assert main(["smoke", "--family", "qwen2_5_vl"]) == 0
    out = capsys.readouterr().out
    assert "family=qwen2_5_vl" in out and "post-instruction tokens" in out and "image batch" in out


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
