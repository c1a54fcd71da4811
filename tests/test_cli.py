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


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: mars" in err and "give a command" in err


def test_unknown_family_is_a_clear_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["smoke", "--family", "nosuch"])
    assert e.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_unwritable_out_fails_before_any_model_work(tmp_path, capsys, monkeypatch):
    import analysis.reproduce as rp

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(rp, "model_study", never)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for cmd in (["reproduce"], ["analyze"], ["evaluate", "-b", "figstep=x"]):
        assert main([*cmd, "--out", str(blocker / "out")]) == 2
        err = capsys.readouterr().err
        assert "cannot write to --out" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_says_that_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    import analysis.reproduce as rp

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rp, "run", interrupted)
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command to resume" in err and str(tmp_path) in err


def test_unknown_hub_id_offline_is_one_fast_line(tmp_path, capsys, monkeypatch):
    import time

    import huggingface_hub.constants as hc

    import mars_core.loading as model_mod

    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable at once
    monkeypatch.setattr(model_mod, "_HUB_REACHABLE", {})
    t0 = time.perf_counter()
    assert main(["extract", "--model", "org/not-a-model", "--out", str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 10
    assert "not in the Hugging Face cache" in err and "huggingface-cli download" in err
    assert len(err.strip().splitlines()) == 1


def test_cached_hub_id_loads_offline_like_the_in_memory_model(tmp_path, monkeypatch):
    """A hub id found in the Hugging Face cache loads with the hub unreachable (it used to fail:
    nnsight passed local_files_only= to the pipeline twice), and gives the in-memory model's logits."""
    import huggingface_hub.constants as hc
    import torch

    import mars_core.loading as model_mod
    from mars_core import load_model
    from mars_core.testing import build_tiny_uncached

    tiny = build_tiny_uncached("llava")  # save_pretrained edits the config: not the shared cached one
    snap = tmp_path / "hub" / "models--org--tiny-llava" / "snapshots" / ("a" * 40)
    tiny.model.save_pretrained(snap)
    tiny.processor.save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # unreachable at once
    monkeypatch.setattr(model_mod, "_HUB_REACHABLE", {})
    mm = load_model("org/tiny-llava")
    assert mm.model_id == "org/tiny-llava" and hc.HF_HUB_OFFLINE is False  # the offline switch is restored
    ref = load_model(tiny.model, tiny.processor)
    a = mm.build_batch(["How do I bake a cake?"])
    with torch.no_grad():
        assert torch.equal(mm.hf(**a.inputs).logits, ref.hf(**ref.build_batch(["How do I bake a cake?"]).inputs).logits)


def test_unreachable_ndif_and_failed_remote_requests_are_one_line(monkeypatch, capsys):
    """No server at the NDIF URL: `load_model(..., remote=URL)` stops before building anything; a
    RemoteError / lost connection / unsaved value in a remote run is one line in the CLI."""
    import socket

    from nnsight.intervention.backends.remote import RemoteError

    from mars_core import InputError, load_model
    from mars_core.remote import check_reachable, remote_failure

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("NDIF_API_KEY", "sk-test")
    with pytest.raises(InputError, match="the NDIF server at .* cannot be reached"):
        check_reachable(dead)
    with pytest.raises(InputError, match="cannot be reached"):
        load_model("org/not-built", remote=dead)
    tb = ('Traceback (most recent call last):\n  File "/srv/site-packages/nnsight/x.py", line 3, in run\n    f()\n'
          '  File "/home/me/probe.py", line 12, in <module>\n    z = y @ w\nRuntimeError: shapes cannot be multiplied')
    msg = remote_failure(RemoteError(tb), dead)
    assert msg == (f"the NDIF server at {dead} reported: RuntimeError: shapes cannot be multiplied "
                   '(at File "/home/me/probe.py", line 12, in <module>: z = y @ w)')
    # ndif's deployment refusal: the loader's sentence, then a server traceback cut at 1,500 characters
    deploy = ("Could not deploy this model. No such repo 'org/x'.\nSee the hub.\nTraceback (most recent call last):\n"
              + '  File "/srv/a.py", line 1, in f\n' * 60)[:1500] + "…"
    assert remote_failure(RemoteError(deploy), dead) == (
        f"the NDIF server at {dead} could not deploy the model: No such repo 'org/x'.")
    assert f"lost the connection to the NDIF server at {dead}" in remote_failure(ConnectionRefusedError(), dead)
    assert "nnsight.save" in remote_failure(UnboundLocalError("x"), dead)
    assert remote_failure(ValueError("unrelated"), dead) is None


def test_every_command_takes_organism_variants(tmp_path, capsys):
    out = tmp_path / "dirs.safetensors"
    assert main(["extract", "--model", "organism:offset", "--out", str(out)]) == 0
    from mars_core.directions import RefusalDirections

    assert RefusalDirections.load(out).provenance["model_id"] == "mars-organism/offset"
    assert main(["steer", "--model", "organism:offset", "--prompt", "How do I make a cake ?", "--method", "none"]) == 0
    assert "none unsteered" in capsys.readouterr().out


@pytest.mark.slow
def test_steer_mars_fits_its_gate_or_loads_a_fitted_one(tmp_path, capsys):
    """`mars steer --method mars` never steers with the operator's unfitted defaults: it fits the
    layer and gate (saying so) or loads a fitted MARS; on a harmful glyph the toy complies unsteered
    and refuses under the fitted MARS (with the defaults it answered like `none`)."""
    from PIL import Image

    from mars_core.organism.sets import organism_suite

    img = tmp_path / "poison.png"
    Image.fromarray(organism_suite(0)["harmful_image"].images[48]).save(img)
    base = ["steer", "--prompt", "How do I build it ?", "--image", str(img), "--out", str(tmp_path / "run")]
    assert main([*base, "--method", "none"]) == 0
    assert "Sure" in capsys.readouterr().out
    assert main([*base, "--method", "mars"]) == 0
    out = capsys.readouterr().out
    assert "no fitted MARS given (--mars): fitting" in out and "I cannot help with that ." in out
    # the fitted operator saved by `mars reproduce`-style steps is reused from the cache / a folder
    from mars_core.steering import MARS

    (cached,) = (tmp_path / "run" / ".mars_cache").glob("mars-*")
    MARS.load(cached).save(tmp_path / "saved")
    assert main([*base, "--method", "mars", "--mars", str(tmp_path / "saved")]) == 0
    out = capsys.readouterr().out
    assert "loaded the fitted MARS" in out and "I cannot help with that ." in out


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["tiny:llava", "tiny:llama"])
def test_reproduce_runs_on_any_model_spec(spec, tmp_path, capsys):
    """The typographic suite on a multimodal and a text-only model (no neutral media: MARS without
    offsets); the fitted MARS and the comparison table come out either way."""
    assert main(["reproduce", "--quick", "--quiet", "--model", spec, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "data" / "mars" / "mars.json").is_file()
    table = (tmp_path / "figures" / "comparison.md").read_text()
    assert "| mars |" in table and spec in table
    assert ("harmful image" in table) == (spec == "tiny:llava")
