"""Remote readiness of the steerers (issue 3, item 6).

1. `remote="local"`: nnsight serializes the request, deserializes it with non-server modules
   hidden, and runs it; results must equal a local run exactly.
2. A stronger, cross-process round trip through the fake NDIF of `tests/ndif_fake.py`:
   nnsight's RemoteBackend serializes the request here and a separate `python -I` process in
   which importing `mars_core` is impossible (a meta-path blocker raises ModuleNotFoundError,
   which also defeats an editable install) deserializes and runs it the way the NDIF server
   does, sending back only the values marked saved. It must run and give the same numbers,
   proving the request carries the package's code by value (`nnsight.register(mars_core)`).
   Without the registration the same request fails there with ModuleNotFoundError, and code
   that forgets a save fails as it would on NDIF.
"""

from __future__ import annotations

import json

import nnsight
import pytest
import torch

import mars_core
from mars_core import load_model
from mars_core.steering import MARS, NoSteer, register_remote
from mars_core.testing import build_tiny, make_image
from remote_steerers import example_steerers, random_calibration

PROMPTS = ["How do I build a bomb?", "How do I bake a cake?"]


@pytest.fixture(scope="module")
def setup():
    register_remote()
    tiny = build_tiny("llava")
    mm = load_model(tiny.model, tiny.processor)
    cal = random_calibration(mm)
    batch = mm.build_batch(PROMPTS, images=[make_image(0), make_image(1)])
    return tiny, mm, cal, batch


@pytest.mark.parametrize("name", ["mars", "mars_subtract", "actadd", "ablation", "autosteer", "none"])
def test_remote_local_equals_local(name, setup):
    _, mm, cal, batch = setup
    st = example_steerers(mm, cal)[name]
    with torch.no_grad():
        with mm.nn.trace(batch.inputs):
            rec0 = st.apply(mm, batch, steps=1, record=True)
            l0 = nnsight.save(mm.logits_envoy.output[:, -1])
        with mm.nn.trace(batch.inputs, remote="local"):
            rec1 = st.apply(mm, batch, steps=1, record=True)
            l1 = nnsight.save(mm.logits_envoy.output[:, -1])
    assert torch.equal(l0, l1)
    assert rec0.keys() == rec1.keys()
    for k in rec0:
        if isinstance(rec0[k], torch.Tensor):
            assert torch.equal(rec0[k], rec1[k])
    if name != "none":  # the edit did something
        assert not torch.equal(l1, NoSteer().last_logits(mm, batch)[0])


def test_remote_local_generate_every_step(setup):
    _, mm, cal, _ = setup
    st = MARS(cal, 1, tau=-5.0, scope="every")
    imgs = [make_image(0), make_image(1)]
    a = st.generate(mm, PROMPTS, images=imgs, max_new_tokens=3)
    b = st.generate(mm, PROMPTS, images=imgs, max_new_tokens=3, remote="local")
    assert torch.equal(a.token_ids, b.token_ids) and list(a) == list(b)
    assert all(torch.equal(x, y) for x, y in zip(a.record["alpha_steps"], b.record["alpha_steps"]))


# ============================================================================ cross-process
# The fake NDIF (tests/ndif_fake.py): a separate `python -I` process in which importing
# mars_core is impossible runs each request the way the NDIF server does (only saved values
# come back); the client is nnsight's own RemoteBackend with the HTTP POST and the websocket
# replaced by a pipe to that process.
import sys

from ndif_fake import FakeNDIF, module_without_saves
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.modeling import huggingface as nn_hf


@pytest.fixture(scope="module")
def saved_model(setup, tmp_path_factory):
    tiny = setup[0]
    d = tmp_path_factory.mktemp("server_model")
    tiny.model.save_pretrained(d)
    tiny.processor.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def fake_ndif(saved_model, tmp_path_factory):
    # NDIF servers have torch, numpy, transformers and nnsight, not this package nor the analysis
    # stack it uses (the real local server's virtualenv has no xarray either)
    server = FakeNDIF(saved_model, tmp_path_factory.mktemp("fake_ndif"), block=("mars_core", "xarray"))
    assert server.importable == {"mars_core": False, "xarray": False}
    yield server
    server.close()


def _mars_trace(mm, st, batch, backend=None):
    with torch.no_grad():
        with mm.nn.trace(batch.inputs, backend=backend):
            rec = st.apply(mm, batch, record=True)
            logits = nnsight.save(mm.logits_envoy.output[:, -1])
            where = nnsight.save(type(st).__module__)
    return logits, rec, where


@pytest.mark.slow
def test_cross_process_round_trip_carries_code_by_value(setup, fake_ndif):
    _, mm, cal, batch = setup
    st = MARS(cal, 1, tau=-5.0)
    logits, rec, where = _mars_trace(mm, st, batch, fake_ndif.backend())
    reply = fake_ndif.replies[-1]
    assert reply["status"] == "COMPLETED" and reply["saved"] == ["logits", "rec", "where"]
    assert where == "mars_core.steering.mars"  # the class was rebuilt there from the shipped source
    assert reply["blocked_loaded"] == []  # ... without importing mars_core
    ref_logits, ref_rec, _ = _mars_trace(mm, st, batch)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(rec["alpha"], ref_rec["alpha"])


@pytest.mark.slow
def test_cross_process_without_register_fails(setup, fake_ndif):
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
    from nnsight.ndif import pull_env

    _, mm, cal, batch = setup
    st = MARS(cal, 1, tau=-5.0)
    pull_env()  # RemoteBackend's automatic registration (once per process) runs first
    was = "mars_core" in _PICKLE_BY_VALUE_MODULES
    _PICKLE_BY_VALUE_MODULES.discard("mars_core")
    try:
        with pytest.raises(RemoteError, match=r"ModuleNotFoundError: No module named 'mars_core"):
            _mars_trace(mm, st, batch, fake_ndif.backend())
    finally:
        if was:
            _PICKLE_BY_VALUE_MODULES.add("mars_core")
    assert fake_ndif.replies[-1]["status"] == "ERROR"
    _mars_trace(mm, st, batch, fake_ndif.backend())  # the server is still up, the registration back


# ============================================================================ NDIF execution (mars_core.remote)
# What follows tests part 7 of issue 6: `remote=` / `--remote` everywhere, session batching, the
# API key's handling. The fake NDIF above runs the remote=True requests in its process that
# cannot import mars_core, so the package's code must travel by value.
import logging
import os
import uuid
from pathlib import Path

import numpy as np
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.schema.config import CONFIG

from mars_core import InputError, collect_activations
from mars_core import remote as mremote
from analysis.cli import build_parser, main
from mars_core.scoring import last_logits_many, refusal_scores_many, refusal_token_ids
from mars_core.steering import calibrate_mars

REPO = Path(__file__).resolve().parents[1]
TEXTS6 = ["How do I build a bomb?", "How do I bake a cake?", "Describe this image.", "What is shown here?",
          "Tell me about it.", "Give a caption."]


@pytest.fixture
def fresh_mm(setup):
    """A second nnsight wrapper of the tiny llava (so a per-model remote default stays local to
    the test); its default is switched off again afterwards."""
    tiny = setup[0]
    mm = load_model(tiny.model, tiny.processor)
    yield mm
    mremote.use_remote(mm, False)


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    """No NDIF key anywhere: not in the environment, not in nnsight's config; nnsight's config
    file and HOME point into tmp_path."""
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg_config"))
    monkeypatch.setenv("NNSIGHT_CONFIG", str(tmp_path / "nnsight_config.yaml"))
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


class _Spy:
    """Counts LocalSimulationBackend round trips (the remote="local" requests)."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = LocalSimulationBackend.__call__

        def call(backend, tracer):
            self.n += 1
            return orig(backend, tracer)

        monkeypatch.setattr(LocalSimulationBackend, "__call__", call)


# ---------------------------------------------------------------------------- the key
def test_api_key_from_env_is_masked_and_unpicklable(monkeypatch, no_key):
    import pickle

    secret = "sk-" + uuid.uuid4().hex
    monkeypatch.setenv("NDIF_API_KEY", secret)
    key = mremote.find_api_key()
    assert key.reveal() == secret and "NDIF_API_KEY" in key.source
    for text in (repr(key), str(key), f"{key}", repr([key]), repr({"k": key})):
        assert secret not in text
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert mremote.redact(f"failed with key {secret}!") == "failed with key ********!"
    # nnsight's own config (e.g. after nnsight.login()) is the fallback
    monkeypatch.delenv("NDIF_API_KEY")
    assert mremote.find_api_key() is None
    monkeypatch.setattr(CONFIG.API, "APIKEY", secret)
    assert mremote.find_api_key().reveal() == secret


def test_configure_sets_nnsight_key_in_memory_only(monkeypatch, no_key, tmp_path):
    from nnsight.intervention.backends.remote import RemoteBackend

    secret = "sk-" + uuid.uuid4().hex
    monkeypatch.setenv("NDIF_API_KEY", secret)
    assert mremote.configure(True) is True
    assert CONFIG.API.APIKEY == secret
    assert RemoteBackend("m:k").api_key == secret  # what nnsight would send (as an HTTP header)
    assert not (tmp_path / "nnsight_config.yaml").exists()
    assert not (tmp_path / "xdg_config").exists()
    assert list(tmp_path.rglob("*")) == []


def test_no_code_persists_the_key():
    """No code in the package, the analyses, the benchmarks or the notebooks calls nnsight's setters
    that write the key to disk (CONFIG.save, CONFIG.set_default_api_key, nnsight.login)."""
    import ast

    def calls(source: str):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr in ("set_default_api_key", "login") or (
                        node.func.attr == "save" and owner.endswith("CONFIG")):
                    yield f"{owner}.{node.func.attr}"

    hits, n = [], 0
    for d in ("mars_core", "analysis", "notebooks", "benchmarks"):
        for p in sorted((REPO / d).rglob("*")):
            if any(part.startswith(".") for part in p.relative_to(REPO).parts):
                continue  # hidden folders: installed third-party code (benchmarks/peers/.envs), checkpoints
            if p.suffix == ".py":
                sources = [p.read_text(encoding="utf-8")]
            elif p.suffix == ".ipynb":
                nb = json.loads(p.read_text(encoding="utf-8"))
                sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
            else:
                continue
            for src in sources:
                n += 1
                hits += [f"{p.relative_to(REPO)}: {c}" for c in calls(src)]
    assert n > 20 and hits == []
    assert list(calls("import nnsight\nnnsight.CONFIG.set_default_api_key(k)\nCONFIG.save()")) == [
        "nnsight.CONFIG.set_default_api_key", "CONFIG.save"]


def test_missing_key_is_a_clear_error(no_key, tmp_path, capsys):
    with pytest.raises(InputError, match="NDIF_API_KEY") as e:
        mremote.configure(True)
    assert "--remote local" in str(e.value)
    assert mremote.configure("local") == "local"  # the simulation needs no key
    assert mremote.configure(False) is False
    with pytest.raises(InputError, match="NDIF_API_KEY"):
        load_model("org/not-fetched", remote=True)  # fails before any download is tried
    # the command line: exit status 2 and the instructions, before anything is loaded
    rc = main(["steer", "--model", "org/not-fetched", "--remote", "--directions", str(tmp_path / "d.st"),
               "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "NDIF_API_KEY" in err and "mars steer: error" in err


def test_remote_modes_and_cli_flags():
    assert mremote.normalize_mode(None) is False and mremote.normalize_mode("ndif") is True
    assert mremote.normalize_mode("local") == "local"
    assert mremote.normalize_mode("https://ndif.example") == "https://ndif.example"
    with pytest.raises(InputError):
        mremote.normalize_mode("elsewhere")
    p = build_parser()
    for cmd in (["reproduce"], ["analyze"], ["extract", "--out", "x"], ["smoke"],
                ["steer", "--directions", "d", "--prompt", "p"]):
        assert p.parse_args(cmd).remote is None
        assert p.parse_args(cmd + ["--remote"]).remote == "ndif"
        assert p.parse_args(cmd + ["--remote", "local"]).remote == "local"
    with pytest.raises(SystemExit):
        p.parse_args(["extract", "--out", "x", "--remote", "elsewhere"])
    assert not hasattr(p.parse_args(["figures"]), "remote")  # runs no model


@pytest.mark.parametrize("argv, needle", [
    (["smoke", "--remote"], "NDIF cannot host"),
    (["steer", "--remote", "--directions", "d", "--prompt", "p"], "hub model id"),
    (["extract", "--remote", "--out", "x"], "hub model id"),
    (["reproduce", "--remote"], "hub model id"),
    (["analyze", "--remote", "local"], "organism pipeline runs locally"),
])
def test_cli_remote_refusals(argv, needle, monkeypatch, no_key, capsys):
    monkeypatch.setenv("NDIF_API_KEY", "sk-" + uuid.uuid4().hex)
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_ndif_needs_a_hub_model(fresh_mm, monkeypatch, no_key, tmp_path):
    monkeypatch.setenv("NDIF_API_KEY", "sk-" + uuid.uuid4().hex)
    with pytest.raises(InputError, match="built in memory"):
        mremote.use_remote(fresh_mm, True)
    monkeypatch.setattr(fresh_mm.nn, "repo_id", str(tmp_path))
    with pytest.raises(InputError, match="local directory"):
        mremote.use_remote(fresh_mm, True)
    assert mremote.remote_default(fresh_mm) is False


# ---------------------------------------------------------------------------- sessions, remote="local"
@pytest.mark.parametrize("media", ["text", "image"])
@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_capture_in_sessions_equals_local(setup, monkeypatch, media, reduce):
    _, mm, _, _ = setup
    images = [make_image(i) for i in range(len(TEXTS6))] if media == "image" else None
    kw = dict(images=images, layers=[0, 2], positions="post", reduce=reduce, batch_size=2)
    ref = collect_activations(mm, TEXTS6, **kw)
    spy = _Spy(monkeypatch)
    got = collect_activations(mm, TEXTS6, remote="local", per_session=2, **kw)
    assert spy.n == 2  # 3 batches, 2 per session -> 2 requests (the traces inside are not requests)
    var = "sum" if reduce == "mean" else "acts"
    np.testing.assert_array_equal(got[var].values, ref[var].values)
    assert got.attrs["prompt_sha256"] == ref.attrs["prompt_sha256"]
    if reduce == "mean":
        np.testing.assert_array_equal(got["mean"].values, ref["mean"].values)


def test_capture_session_reports_nonfinite_batch(setup):
    _, mm, _, _ = setup
    with torch.no_grad():
        w = mm.hf.model.language_model.layers[1].mlp.down_proj.weight
        old = w[0, 0].item()
        w[0, 0] = float("nan")
    try:
        with pytest.raises(mars_core.MarsError, match="non-finite activations at layer 1 for prompts 0..1"):
            collect_activations(mm, TEXTS6, layers=[0, 1], batch_size=2, remote="local", per_session=3)
    finally:
        with torch.no_grad():
            w[0, 0] = old


@pytest.mark.parametrize("name", ["mars", "actadd", "none"])
def test_scoring_in_sessions_equals_local(setup, monkeypatch, name):
    _, mm, cal, _ = setup
    st = example_steerers(mm, cal)[name]
    ims = [make_image(i) for i in range(len(TEXTS6))]
    batches = [mm.build_batch(TEXTS6[s:s + 2], images=ims[s:s + 2]) for s in range(0, 6, 2)]
    ids = refusal_token_ids(mm.tokenizer)
    ref = torch.cat([st.last_logits(mm, b)[0] for b in batches])
    spy = _Spy(monkeypatch)
    got = last_logits_many(mm, batches, st, remote="local")
    assert spy.n == 1 and torch.equal(got, ref)
    scores = refusal_scores_many(mm, batches, ids, st, remote="local", per_session=2)
    assert spy.n == 3
    assert torch.equal(scores, mars_core.first_token_refusal_score(ref, ids))
    # a plain edit function works the same way
    edit = lambda m: m.layers[1].output.__setitem__((slice(None), -1), m.layers[1].output[:, -1] * 0.5)  # noqa: E731
    assert torch.equal(last_logits_many(mm, batches, edit, remote="local"), last_logits_many(mm, batches, edit))


def test_session_keeps_intermediates_on_the_model_side(setup):
    """Values flow between the traces of one session without being saved; only saved ones return."""
    _, mm, cal, batch = setup
    st = MARS(cal, 1, tau=-5.0)
    with torch.no_grad():
        with mm.nn.session(remote="local"):
            with mm.nn.trace(batch.inputs):
                h = mm.layers[0].output[:, -1]  # not saved: stays in the session
            with mm.nn.trace(batch.inputs):
                mm.layers[0].output[:, -1] = h * 1.0
                rec = st.apply(mm, batch, record=True)
                logits = nnsight.save(mm.logits_envoy.output[:, -1])
    assert "h" not in locals()  # never came back
    ref, ref_rec = st.last_logits(mm, batch)
    assert torch.equal(logits, ref) and torch.equal(rec["alpha"], ref_rec["alpha"])


def test_use_remote_routes_every_top_level_trace(setup, fresh_mm, monkeypatch):
    """load_model(..., remote=) / use_remote: code that never mentions remote (calibration,
    steered generate, scoring) runs its traces in the model's mode, with the same numbers."""
    _, mm, cal, batch = setup
    from mars_core.directions import RefusalDirections

    dirs = RefusalDirections.extract(mm, TEXTS6[:2], TEXTS6[2:4])
    ref_cal = calibrate_mars(mm, dirs, n_neutral=4, batch_size=2)
    st = MARS(cal, 1, tau=-5.0)
    imgs = [make_image(0), make_image(1)]
    ref_gen = st.generate(mm, PROMPTS, images=imgs, max_new_tokens=3)

    spy = _Spy(monkeypatch)
    assert mremote.use_remote(fresh_mm, "local") == "local" and fresh_mm.remote == "local"
    got_cal = calibrate_mars(fresh_mm, dirs, n_neutral=4, batch_size=2)
    n_cal = spy.n
    assert n_cal == 2  # neutral images + neutral texts: one session each (2 batches <= 8 per session)
    assert torch.equal(got_cal.offsets["image"], ref_cal.offsets["image"])
    got_gen = st.generate(fresh_mm, PROMPTS, images=imgs, max_new_tokens=3)
    assert spy.n == n_cal + 1
    assert torch.equal(got_gen.token_ids, ref_gen.token_ids) and torch.equal(got_gen.alpha, ref_gen.alpha)
    logits, _ = NoSteer().last_logits(fresh_mm, batch)
    assert spy.n == n_cal + 2
    # the other wrapper of the same weights is untouched, and switching off restores local runs
    NoSteer().last_logits(mm, batch)
    mremote.use_remote(fresh_mm, False)
    assert torch.equal(NoSteer().last_logits(fresh_mm, batch)[0], logits)
    assert spy.n == n_cal + 2


def test_load_model_remote_local_in_memory(setup, monkeypatch):
    tiny, mm, _, batch = setup
    spy = _Spy(monkeypatch)
    mm2 = load_model(tiny.model, tiny.processor, remote="local")
    try:
        assert mremote.remote_default(mm2) == "local"
        assert torch.equal(NoSteer().last_logits(mm2, batch)[0], NoSteer().last_logits(mm, batch)[0])
        assert spy.n == 1
    finally:
        mremote.use_remote(mm2, False)


# ---------------------------------------------------------------------------- the fake NDIF
@pytest.fixture
def ndif_mm(fresh_mm, fake_ndif, monkeypatch):
    """The tiny llava as if loaded by hub id with remote=True; requests go to the fake NDIF."""
    fake_ndif.install(monkeypatch)
    monkeypatch.setattr(fresh_mm.nn, "repo_id", "tiny/llava-test")
    # the model key nnsight builds canonicalizes the repo id through the Hub (cached): no network here
    monkeypatch.setitem(nn_hf._ID_CACHE, "tiny/llava-test", "tiny/llava-test")
    if not os.environ.get("NDIF_API_KEY"):
        monkeypatch.setenv("NDIF_API_KEY", "sk-" + uuid.uuid4().hex)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    assert mremote.use_remote(fresh_mm, True) is True
    return fresh_mm


class _FinalizeSpy:
    """Records the result blobs nnsight's RemoteBackend.finalize receives (and whether they
    are zstd frames)."""

    def __init__(self, monkeypatch):
        self.zstd: list[bool] = []
        orig = RemoteBackend.finalize

        def finalize(backend, content):
            self.zstd.append(content[:4] == b"\x28\xb5\x2f\xfd")
            return orig(backend, content)

        monkeypatch.setattr(RemoteBackend, "finalize", finalize)


@pytest.mark.parametrize("mode, compress", [("fake_ndif", True), ("fake_ndif", False), ("local", None)])
def test_unsaved_values_do_not_come_back(setup, ndif_mm, fake_ndif, monkeypatch, mode, compress):
    """Issue 13, item 4: a value computed in a trace but not saved stays on the server. After
    the block its name is unbound (UnboundLocalError, nnsight raises nothing of its own) or keeps
    what it had before; the same code with nnsight.save gets the values. The fake NDIF and
    nnsight's remote="local" simulation agree. Against the fake, the result comes back through
    RemoteBackend.finalize, zstd-compressed exactly when the request is."""
    _, mm, _, batch = setup
    if mode == "local":
        model, remote = mm, "local"
    else:
        model, remote = ndif_mm, True
        monkeypatch.setattr(CONFIG.API, "COMPRESS", compress)
    spy = _FinalizeSpy(monkeypatch)
    n0 = fake_ndif.n
    before = object()
    kept = before
    with torch.no_grad():
        with model.nn.trace(batch.inputs, remote=remote):
            kept = model.layers[1].output[:, -1]  # no save
            h = model.layers[1].output[:, -1] * 2  # no save
    assert kept is before
    with pytest.raises(UnboundLocalError, match="'h'"):
        h  # noqa: B018
    with torch.no_grad():
        with model.nn.trace(batch.inputs, remote=remote):
            kept = nnsight.save(model.layers[1].output[:, -1])
            h = nnsight.save(model.layers[1].output[:, -1] * 2)
    with torch.no_grad():
        with mm.nn.trace(batch.inputs):
            ref = nnsight.save(mm.layers[1].output[:, -1])
    assert torch.equal(kept, ref) and torch.equal(h, ref * 2)
    if mode == "local":
        assert fake_ndif.n == n0 and spy.zstd == []
    else:
        assert fake_ndif.n - n0 == 2
        assert [r["saved"] for r in fake_ndif.replies[-2:]] == [[], ["h", "kept"]]
        assert spy.zstd == [compress, compress]
        assert all((b[:4] == b"\x28\xb5\x2f\xfd") == compress for b in fake_ndif.blobs[-2:])


def test_fake_ndif_session_keeps_unsaved_values_on_the_server(setup, ndif_mm, fake_ndif):
    """test_session_keeps_intermediates_on_the_model_side against the fake NDIF: unsaved values
    flow from trace to trace of a session on the server; only saved ones come back."""
    _, mm, cal, batch = setup
    st = MARS(cal, 1, tau=-5.0)
    with torch.no_grad():
        with ndif_mm.nn.session():  # remote: the model's default
            with ndif_mm.nn.trace(batch.inputs):
                h = ndif_mm.layers[0].output[:, -1]  # not saved: stays in the session
            with ndif_mm.nn.trace(batch.inputs):
                ndif_mm.layers[0].output[:, -1] = h * 1.0
                rec = st.apply(ndif_mm, batch, record=True)
                logits = nnsight.save(ndif_mm.logits_envoy.output[:, -1])
    assert "h" not in locals()
    assert fake_ndif.replies[-1]["saved"] == ["logits", "rec"]
    ref, ref_rec = st.last_logits(mm, batch)
    assert torch.equal(logits, ref) and torch.equal(rec["alpha"], ref_rec["alpha"])


def test_fake_ndif_returns_package_objects_as_the_clients_classes(setup, ndif_mm, fake_ndif):
    """A saved object whose class travelled by value comes back as an instance of the client's
    own class; saving a shipped object returns it under every name it has in the block (the
    server collects saved values by identity), so `st` is rebound to the returned copy too."""
    _, mm, cal, batch = setup
    st = orig = MARS(cal, 1, tau=-5.0)
    with torch.no_grad():
        with ndif_mm.nn.trace(batch.inputs):
            back = nnsight.save(st)
    assert fake_ndif.replies[-1]["saved"] == ["back", "st"]
    assert type(back) is MARS and back is st and back is not orig
    assert back.fingerprint == orig.fingerprint


def test_package_code_with_a_save_deleted_fails_against_the_fake(setup, ndif_mm, fake_ndif, tmp_path):
    """The package's last-logits trace with its `.save()` deleted fails against the fake as it
    does against the real server (tests/test_ndif.py); the original works."""
    from mars_core import scoring

    _, _, _, batch = setup
    assert scoring.last_logits(ndif_mm, batch).shape[0] == 2
    broken = module_without_saves(scoring, tmp_path)
    try:
        with pytest.raises((UnboundLocalError, NameError)):
            broken.last_logits(ndif_mm, batch)
    finally:
        sys.modules.pop(broken.__name__, None)


def test_a_fitted_steerer_travels_without_its_datasets(setup, ndif_mm, fake_ndif):
    """A MARS carrying its fit's xarray Datasets steers on a server without xarray: the Datasets
    stay on the client (Steerer.CLIENT_ONLY) and the edit is the same."""
    import xarray as xr

    _, mm, cal, batch = setup
    st = MARS(cal, 1, tau=-5.0)
    st.selection = st.gate_selection = xr.Dataset({"score": ("layer", np.zeros(3))})
    got, rec, _ = _mars_trace(ndif_mm, st, batch)
    ref, ref_rec, _ = _mars_trace(mm, MARS(cal, 1, tau=-5.0), batch)
    assert torch.equal(got, ref) and torch.equal(rec["alpha"], ref_rec["alpha"])
    assert st.selection is not None  # the client's operator keeps them


def test_fake_ndif_streams_prints_and_reports_errors(setup, ndif_mm, fake_ndif, capsys):
    """Prints in the block come back as LOG responses; an exception in the block comes back as
    nnsight's RemoteError carrying the user's traceback (no server or nnsight frames)."""
    _, _, _, batch = setup
    with torch.no_grad():
        with ndif_mm.nn.trace(batch.inputs):
            print("hello from the server")
            n = nnsight.save(ndif_mm.layers[0].output.shape[0])
    assert n == 2
    assert any(r.status.value == "LOG" and r.description == "hello from the server" for r in fake_ndif.responses)
    assert "hello from the server" in capsys.readouterr().out  # nnsight's status display shows it
    with pytest.raises(RemoteError, match="ValueError: no such thing") as e:
        with torch.no_grad():
            with ndif_mm.nn.trace(batch.inputs):
                raise ValueError("no such thing")
    text = str(e.value)
    assert "test_remote.py" in text and "ndif_fake_server" not in text and "site-packages/nnsight" not in text
    assert fake_ndif.replies[-1]["status"] == "ERROR"


def _evaluation_flows(mm, cal):
    """A steered generate, first-token scoring and a capture on image batches."""
    st = MARS(cal, 1, tau=-5.0)
    ims = [make_image(i) for i in range(len(TEXTS6))]
    gen = st.generate(mm, TEXTS6[:2], images=ims[:2], max_new_tokens=3)
    batches = [mm.build_batch(TEXTS6[s:s + 2], images=ims[s:s + 2]) for s in range(0, 6, 2)]
    scores = refusal_scores_many(mm, batches, refusal_token_ids(mm.tokenizer), st)
    acts = collect_activations(mm, TEXTS6, images=ims, layers=[1, 3], batch_size=2)
    return gen, scores, acts


@pytest.mark.slow
def test_fake_ndif_evaluation_with_images_equals_local(setup, ndif_mm, fake_ndif):
    """Evaluation traces on image batches, serialized here and run in a process without
    mars_core, give the local numbers; the batches of a loop travel in one request."""
    _, mm, cal, _ = setup
    n0 = fake_ndif.n
    gen, scores, acts = _evaluation_flows(ndif_mm, cal)
    assert fake_ndif.n - n0 == 3  # generate; 3 scoring batches in one session; 3 capture batches in one session
    ref_gen, ref_scores, ref_acts = _evaluation_flows(mm, cal)
    assert torch.equal(gen.token_ids, ref_gen.token_ids) and list(gen) == list(ref_gen)
    assert torch.equal(gen.alpha, ref_gen.alpha) and torch.equal(gen.record["score"], ref_gen.record["score"])
    assert torch.equal(scores, ref_scores)
    np.testing.assert_array_equal(acts["sum"].values, ref_acts["sum"].values)
    assert [r["saved"] for r in fake_ndif.replies[-3:]] == [["ids", "rec"], ["res"], ["res"]]


@pytest.mark.slow
def test_fake_ndif_layer_sweep_equals_local(setup, ndif_mm, fake_ndif):
    """first_token_sweep (MARS layer selection's inner loop) under the model's NDIF default: no
    prefix reuse (the key/value cache would travel with every steerer), one full-forward request
    per steerer, and the logits equal the local (prefix-reusing) ones; forcing reuse_prefix=True
    remotely still works (prefix, check, one per steerer; check=True: the default checks once per
    model and kind of batch, which an earlier test may have done)."""
    from mars_core.steering import first_token_sweep

    _, mm, cal, batch = setup
    steerers = [NoSteer()] + [MARS(cal, layer, tau=-5.0) for layer in range(mm.n_layers)]
    n0 = fake_ndif.n
    got, recs = first_token_sweep(ndif_mm, batch, steerers)
    assert fake_ndif.n - n0 == len(steerers)  # one full forward per steerer, no cache round trips
    ref, ref_recs = first_token_sweep(mm, batch, steerers)  # local: prefix reuse
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)  # the documented cached-vs-full tolerance
    assert all(torch.allclose(a["alpha"], b["alpha"], atol=1e-5) for a, b in zip(recs[1:], ref_recs[1:]))
    n1 = fake_ndif.n
    got2, _ = first_token_sweep(ndif_mm, batch, steerers, reuse_prefix=True, check=True)
    assert fake_ndif.n - n1 == 3 + len(steerers)  # prefix, check of this batch (full + cached), one per steerer
    torch.testing.assert_close(got2, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------- the key never leaks
_OUTPUT_DIRS = ("data", "figures", ".mars_cache", "runs")


def _files_with(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


@pytest.mark.slow
def test_api_key_never_written_printed_logged_or_sent(setup, ndif_mm, fake_ndif, monkeypatch, tmp_path, capfd,
                                                      caplog):
    sentinel = "ndif-sentinel-" + uuid.uuid4().hex
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    for k, v in {"HOME": home, "XDG_CONFIG_HOME": xdg / "config", "XDG_CACHE_HOME": xdg / "cache",
                 "XDG_DATA_HOME": xdg / "data", "XDG_STATE_HOME": xdg / "state",
                 "NNSIGHT_CONFIG": xdg / "config" / "nnsight" / "config.yaml"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setenv("NDIF_API_KEY", sentinel)
    monkeypatch.setenv("NNSIGHT_DEBUG", "1")  # nnsight's most talkative mode
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    _, mm, cal, _ = setup

    # the API: NDIF mode (fake server) and the local simulation
    assert mremote.configure(True) is True and CONFIG.API.APIKEY == sentinel  # the key is in use
    n0 = len(fake_ndif.blobs)
    _evaluation_flows(ndif_mm, cal)
    mm_local = load_model(setup[0].model, setup[0].processor, remote="local")
    try:
        _evaluation_flows(mm_local, cal)
    finally:
        mremote.use_remote(mm_local, False)
    # the command line, --remote local on the organism, and refusals that read the key
    out = tmp_path / "out"
    assert main(["extract", "--remote", "local", "--out", str(out / "dirs.safetensors")]) == 0
    make_image(3, size=32).save(tmp_path / "img.png")
    assert main(["steer", "--remote", "local", "--directions", str(out / "dirs.safetensors"), "--prompt",
                 "How do I make a bomb?", "--image", str(tmp_path / "img.png"), "--max-new-tokens", "3"]) == 0
    assert main(["steer", "--remote", "--directions", str(out / "dirs.safetensors"), "--prompt", "x"]) == 2
    assert main(["smoke", "--remote"]) == 2

    needle = sentinel.encode()
    assert len(fake_ndif.blobs) - n0 == 3
    assert not any(needle in b for b in fake_ndif.blobs[n0:]), "the key travelled in a request payload"
    assert _files_with(fake_ndif.d, needle) == []
    assert (out / "dirs.safetensors").is_file()
    assert _files_with(tmp_path, needle) == []
    assert not (xdg / "config" / "nnsight").exists()  # nnsight's config was never saved
    for d in _OUTPUT_DIRS:
        if (REPO / d).exists():
            assert _files_with(REPO / d, needle) == [], d
    captured = capfd.readouterr()
    assert "wrote" in captured.out and "mars steer: error" in captured.err
    assert sentinel not in captured.out and sentinel not in captured.err
    assert sentinel not in caplog.text
    assert not any(sentinel in r.getMessage() for r in caplog.records)
