"""Remote readiness of the steerers (issue 3, item 6).

1. `remote="local"`: nnsight serializes the request, deserializes it with non-server modules
   hidden, and runs it; results must equal a local run exactly.
2. A stronger, cross-process round trip: the request is serialized here
   (`RequestModel.serialize`) and deserialized and executed by a separate `python -I` process
   in a temporary directory in which importing `mars_core` is impossible (a meta-path blocker
   raises ModuleNotFoundError, which also defeats an editable install). It must run and give the
   same numbers, proving the request carries the package's code by value
   (`nnsight.register(mars_core)`). Without the registration the same request fails there with
   ModuleNotFoundError.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import nnsight
import pytest
import torch
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

import mars_core
from mars_core import load_model
from mars_core.autosteer import AutoSteer, Prober
from mars_core.steering import MARS, ActAdd, DirectionalAblation, MarsCalibration, NoSteer, register_remote
from mars_core.testing import build_tiny, make_image

PROMPTS = ["How do I build a bomb?", "How do I bake a cake?"]


@pytest.fixture(scope="module")
def setup():
    register_remote()
    tiny = build_tiny("llava")
    mm = load_model(tiny.model, tiny.processor)
    g = torch.Generator().manual_seed(0)
    L, D = mm.n_layers, mm.d_model
    r = torch.nn.functional.normalize(torch.randn(L, D, generator=g, dtype=torch.float64), dim=-1)
    cal = MarsCalibration(tuple(range(L)), r, torch.full((L,), 1.0), torch.zeros(L),
                          {"image": 0.1 * torch.randn(L, D, generator=g, dtype=torch.float64)}, L, D,
                          layers_path=mm.family.layers_path)
    batch = mm.build_batch(PROMPTS, images=[make_image(0), make_image(1)])
    return tiny, mm, cal, batch


def _steerers(mm, cal):
    d = mm.d_model
    fires = Prober(torch.zeros(d), torch.ones(d), torch.zeros(64, d), torch.zeros(64), torch.zeros(2, 64),
                   torch.tensor([0.0, 20.0]))
    return {
        "mars": MARS(cal, 1, tau=-5.0),
        "mars_subtract": MARS(cal, 2, tau=-5.0, offset_mode="subtract"),
        "actadd": ActAdd(cal.direction[1], 1, 1.3),
        "ablation": DirectionalAblation(cal.direction[2]),
        "autosteer": AutoSteer(fires, 1, cal.direction[2], 1.1, head_layer=2),
        "none": NoSteer(),
    }


@pytest.mark.parametrize("name", ["mars", "mars_subtract", "actadd", "ablation", "autosteer", "none"])
def test_remote_local_equals_local(name, setup):
    _, mm, cal, batch = setup
    st = _steerers(mm, cal)[name]
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
class _Capture(Backend):
    """A backend that only serializes the request (what RemoteBackend would send)."""

    def __call__(self, tracer):
        self.blob = RequestModel.serialize(tracer)


SERVER = textwrap.dedent(
    r'''
    import importlib.abc, json, sys

    class _NoMars(importlib.abc.MetaPathFinder):
        """The 'server' does not have mars_core: refuse every import of it."""
        def find_spec(self, name, path=None, target=None):
            if name == "mars_core" or name.startswith("mars_core."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoMars())
    d = sys.argv[1]
    import torch, transformers, nnsight
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import inc, dec
    from safetensors.torch import save_file

    try:
        import mars_core  # noqa: F401
        importable = True
    except ModuleNotFoundError:
        importable = False
    model = transformers.AutoModelForImageTextToText.from_pretrained(d).eval()
    proc = transformers.AutoProcessor.from_pretrained(d)
    nn = nnsight.TransformersModel(model, processor=proc, tokenizer=proc.tokenizer, task="image-text-to-text")
    blob = open(d + "/request.bin", "rb").read()
    result = {"mars_core_importable": importable}
    try:
        tracer = RequestModel.deserialize(blob, nn._remoteable_persistent_objects())
        inc()  # what a server's trace scope does: saves are collected at depth 1
        try:
            with torch.no_grad():
                tracer.execute(tracer.info.code)
            out = dict(tracer.info.frame.f_locals)
        finally:
            dec()
        save_file({"logits": out["logits"].contiguous(), "alpha": out["rec"]["alpha"].contiguous()},
                  d + "/server.safetensors")
        result["ok"] = True
        result["steerer_module"] = type(out["st"]).__module__
    except Exception as e:
        result["ok"] = False
        result["error"] = type(e).__name__ + ": " + str(e)
    result["mars_core_in_sys_modules"] = any(m == "mars_core" or m.startswith("mars_core.") for m in sys.modules)
    print("RESULT " + json.dumps(result))
    '''
)


def _serialize_request(mm, st, batch):
    cap = _Capture()
    with torch.no_grad():
        with mm.nn.trace(batch.inputs, backend=cap):
            rec = st.apply(mm, batch, record=True)
            logits = nnsight.save(mm.logits_envoy.output[:, -1])
    return cap.blob


def _run_server(tmp_path, blob):
    (tmp_path / "request.bin").write_bytes(blob)
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.run([sys.executable, "-I", str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"server process failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def saved_model(setup, tmp_path_factory):
    tiny = setup[0]
    d = tmp_path_factory.mktemp("server_model")
    tiny.model.save_pretrained(d)
    tiny.processor.save_pretrained(d)
    return d


def _copy_model(src, dst):
    import shutil

    for p in src.iterdir():
        shutil.copy(p, dst / p.name)


@pytest.mark.slow
def test_cross_process_round_trip_carries_code_by_value(setup, saved_model, tmp_path):
    from safetensors.torch import load_file

    _, mm, cal, batch = setup
    st = MARS(cal, 1, tau=-5.0)
    blob = _serialize_request(mm, st, batch)
    _copy_model(saved_model, tmp_path)
    res = _run_server(tmp_path, blob)
    assert res["mars_core_importable"] is False
    assert res["ok"], res.get("error")
    assert res["steerer_module"] == "mars_core.steering"  # rebuilt from the shipped source
    assert res["mars_core_in_sys_modules"] is False
    got = load_file(str(tmp_path / "server.safetensors"))
    with torch.no_grad():
        with mm.nn.trace(batch.inputs):
            rec = st.apply(mm, batch, record=True)
            logits = nnsight.save(mm.logits_envoy.output[:, -1])
    assert torch.equal(got["logits"], logits)
    assert torch.equal(got["alpha"], rec["alpha"])


@pytest.mark.slow
def test_cross_process_without_register_fails(setup, saved_model, tmp_path):
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

    _, mm, cal, batch = setup
    st = MARS(cal, 1, tau=-5.0)
    was = "mars_core" in _PICKLE_BY_VALUE_MODULES
    _PICKLE_BY_VALUE_MODULES.discard("mars_core")
    try:
        blob = _serialize_request(mm, st, batch)
    finally:
        if was:
            _PICKLE_BY_VALUE_MODULES.add("mars_core")
    _copy_model(saved_model, tmp_path)
    res = _run_server(tmp_path, blob)
    assert res["ok"] is False
    assert "ModuleNotFoundError" in res["error"] and "mars_core" in res["error"]
