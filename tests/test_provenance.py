"""Provenance records and atomic writes."""

import json
import os

import pytest

import mars_core
from mars_core.provenance import atomic_path, atomic_write_json, make_provenance, sha256_text


def test_atomic_write_replaces_whole_file_and_keeps_mode(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic_write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash midway")
    assert json.loads(p.read_text()) == {"a": 1}  # the old file survives
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]  # no temp file left


def test_make_provenance_flattens_values():
    prov = make_provenance(seed=3, layers=[1, 2], model=None, dtype=float)
    assert prov["mars_version"] == mars_core.__version__ and prov["created"].endswith("+00:00")
    assert prov["seed"] == 3 and prov["layers"] == "[1, 2]" and prov["model"] == ""
    assert isinstance(prov["dtype"], str)


def test_text_hash_is_order_and_boundary_sensitive():
    assert sha256_text(["ab", "c"]) != sha256_text(["a", "bc"])
    assert sha256_text(["a", "b"]) != sha256_text(["b", "a"])
    assert len(sha256_text([])) == 16


def test_tensor_file_round_trip_and_errors(tmp_path):
    import torch

    from mars_core.errors import ArtifactError
    from mars_core.provenance import read_tensor_file, save_tensor_file

    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)[:, ::2]}  # non-contiguous on purpose
    p = save_tensor_file(tmp_path / "x.safetensors", t, {"n": "2"}, fmt="fmt-x", version="1",
                         provenance={"seed": 3})
    got, meta, prov = read_tensor_file(p, fmt="fmt-x", version="1", what="test", required=["a"])
    assert torch.equal(got["a"], t["a"]) and meta["n"] == "2" and prov == {"seed": 3}
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: no temp file left behind
    with pytest.raises(ArtifactError, match="is not a test file"):
        read_tensor_file(p, fmt="fmt-y", version="1", what="test")
    with pytest.raises(ArtifactError, match="format version '1'; this mars reads '2'"):
        read_tensor_file(p, fmt="fmt-x", version="2", what="test")
    with pytest.raises(ArtifactError, match=r"lacks tensors \['b'\]"):
        read_tensor_file(p, fmt="fmt-x", version="1", what="test", required=["a", "b"])
    with pytest.raises(ArtifactError, match="No test file"):
        read_tensor_file(tmp_path / "missing.safetensors", fmt="fmt-x", version="1", what="test")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="Cannot read the test"):
        read_tensor_file(tmp_path / "bad.safetensors", fmt="fmt-x", version="1", what="test")
