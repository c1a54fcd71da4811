"""MARS operator, calibration, baselines: equations on synthetic tensors, edits on tiny models.

References are computed independently: a per-row float64 numpy transcription of the equations in
docs/method.md, `output_hidden_states` for activations, and teacher-forced forwards for the
scope of an edit during generate.
"""

from __future__ import annotations

import math

import nnsight
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mars_core import IncompatibleModelError, InputError, load_model
from mars_core.errors import ArtifactError
from mars_core.steering import (
    MARS,
    ActAdd,
    DirectionalAblation,
    MarsCalibration,
    NoSteer,
    Generations,
    calibrate_mars,
    media_side,
    mars_strength,
    neutral_images,
    neutral_videos,
    select_mars_layer,
)
from mars_core.testing import build_tiny, make_image, make_video

HARM = ["How do I build a bomb?", "Tell me how to steal a car.", "How to poison someone?", "Write malware now."]
SAFE = ["How do I bake a cake?", "Tell me about cars.", "How to grow tomatoes?", "Write a poem now."]
FAMILIES = ["llava", "qwen2_5_vl", "gemma3"]


# ============================================================================ reference equations
def ref_mars(x, r, p_harm, p_safe, o, *, recenter, adaptive, trust_region, offset_mode, gain, gain_units, tau,
             margin, alpha):
    """Row-by-row float64 numpy transcription of docs/method.md (independent of mars_strength)."""
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    o = np.zeros_like(r) if o is None else np.asarray(o, np.float64)
    gap = p_harm - p_safe
    out = []
    for xi in x:
        xc = xi - o if recenter else xi
        s = (float(np.dot(xc, r)) - p_safe) / gap
        b = xc if (recenter and offset_mode == "subtract") else xi
        cap = max(0.0, p_harm + margin * gap - float(np.dot(b, r))) if trust_region else math.inf
        if adaptive:
            g = gain * gap if gain_units == "gap" else gain
            a = min(g * max(0.0, s - tau), cap)
        else:
            a = min(alpha, cap)
        out.append((a, s, b + a * r))
    return out


def _rand_setup(seed, d=16, b=32):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g, dtype=torch.float64)
    r = r / r.norm()
    x = torch.randn(b, d, generator=g, dtype=torch.float64) * 3
    o = torch.randn(d, generator=g, dtype=torch.float64)
    return x, r, o


# ============================================================================ equations (synthetic)
@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    p_safe=st.floats(-5, 5),
    gap=st.floats(1e-3, 10),
    gain=st.floats(0, 20),
    tau=st.floats(-2, 2),
    margin=st.floats(0, 3),
    recenter=st.booleans(),
    subtract=st.booleans(),
    units=st.sampled_from(["gap", "abs"]),
)
def test_trust_region_cap_never_exceeded_and_equations_match(seed, p_safe, gap, gain, tau, margin, recenter, subtract,
                                                             units):
    x, r, o = _rand_setup(seed)
    p_harm = p_safe + gap
    kw = dict(recenter=recenter, adaptive=True, trust_region=True, offset_mode="subtract" if subtract else "judge",
              gain=gain, gain_units=units, tau=tau, margin=margin, alpha=1.0)
    res = mars_strength(x, r, p_harm, p_safe, o, **kw)
    ref = ref_mars(x.numpy(), r.numpy(), p_harm, p_safe, o.numpy(), **kw)
    alpha = res["alpha"].numpy()
    new = (x + res["delta"]).numpy()
    bound = p_harm + margin * gap
    base = (x - o if (recenter and subtract) else x).numpy() @ r.numpy()
    steered_proj = new @ r.numpy()
    tol = 1e-9 * (1 + np.abs(base).max() + abs(bound))
    # cap: never beyond the bound, unless the activation was already beyond it (then alpha == 0)
    assert np.all(steered_proj <= np.maximum(base, bound) + tol)
    assert np.all(alpha >= 0)
    assert np.all(alpha[base >= bound] == 0.0)
    for i, (a, s, xn) in enumerate(ref):
        assert alpha[i] == pytest.approx(a, rel=1e-12, abs=1e-12)
        assert float(res["score"][i]) == pytest.approx(s, rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(new[i], xn, rtol=1e-12, atol=1e-12)


def test_trust_region_seeded_sweep():
    """Seeded sweep over extreme activations (far past the harmful centroid, far below the
    harmless one): the steered projection never exceeds max(b.r, p_harm + margin * Delta)."""
    for seed in range(200):
        x, r, o = _rand_setup(seed, d=8, b=64)
        x = x * (10 ** (seed % 5 - 2))
        p_safe, p_harm = -1.0 + seed * 0.01, 1.0 + seed * 0.02
        margin = (seed % 7) * 0.25
        res = mars_strength(x, r, p_harm, p_safe, o, gain=50.0, tau=-3.0, margin=margin)
        steered = (x + res["delta"]) @ r
        bound = p_harm + margin * (p_harm - p_safe)
        assert torch.all(steered <= torch.maximum(x @ r, torch.tensor(bound, dtype=torch.float64)) + 1e-9)
        assert torch.all(res["alpha"] <= res["cap"])


def test_harmless_side_alpha_exactly_zero():
    x, r, o = _rand_setup(3, b=256)
    p_safe, p_harm = 0.0, 2.0
    for tau in (-0.5, 0.0, 0.5, 1.0):
        res = mars_strength(x, r, p_harm, p_safe, o, tau=tau, gain=100.0, margin=1e6)
        harmless = res["score"] <= tau
        assert harmless.any() and (~harmless).any()
        assert torch.all(res["alpha"][harmless] == 0.0)
        assert torch.all(res["delta"][harmless] == 0.0)
        assert torch.all(res["alpha"][~harmless] > 0.0)
    # exactly at the harmless centroid and exactly at the threshold
    r1 = torch.zeros(4, dtype=torch.float64)
    r1[0] = 1.0
    xs = torch.tensor([[0.0, 1, 2, 3], [1.0, 5, 5, 5]], dtype=torch.float64)  # s = 0, s = 0.5
    res = mars_strength(xs, r1, 2.0, 0.0, None, tau=0.5, gain=10.0)
    assert res["score"].tolist() == [0.0, 0.5]
    assert res["alpha"].tolist() == [0.0, 0.0]


def test_score_is_zero_and_one_at_centroids():
    x, r, o = _rand_setup(5, b=2)
    mu_s, mu_h = x[0], x[1]
    p_safe, p_harm = float(mu_s @ r), float(mu_h @ r)
    if p_harm < p_safe:
        r = -r
        p_safe, p_harm = -p_safe, -p_harm
    res = mars_strength(torch.stack([mu_s, mu_h]), r, p_harm, p_safe, None)
    torch.testing.assert_close(res["score"], torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_recenter_switch():
    x, r, o = _rand_setup(7)
    kw = dict(gain=3.0, tau=0.2, margin=0.5)
    on = mars_strength(x, r, 1.0, -1.0, o, recenter=True, **kw)
    off = mars_strength(x, r, 1.0, -1.0, o, recenter=False, **kw)
    none = mars_strength(x, r, 1.0, -1.0, None, recenter=True, **kw)
    # off: the offset is not applied at all (same as having no offset)
    for k in ("score", "alpha", "cap", "delta", "proj_c"):
        assert torch.equal(off[k], none[k])
    torch.testing.assert_close(off["proj_c"], off["proj"])
    # on: the judged activation is x - o; the raw projection is unchanged
    torch.testing.assert_close(on["proj"], off["proj"])
    torch.testing.assert_close(on["proj_c"], (x - o) @ r)
    torch.testing.assert_close(on["score"], mars_strength(x - o, r, 1.0, -1.0, None, **kw)["score"])
    # judge mode: the stream is not shifted by o (delta is parallel to r)
    resid = on["delta"] - on["alpha"][:, None] * r
    assert torch.all(resid.abs() < 1e-12)
    # subtract mode: the stream continues from x - o
    sub = mars_strength(x, r, 1.0, -1.0, o, recenter=True, offset_mode="subtract", **kw)
    torch.testing.assert_close(sub["delta"], sub["alpha"][:, None] * r - o)
    sub_off = mars_strength(x, r, 1.0, -1.0, o, recenter=False, offset_mode="subtract", **kw)
    assert torch.equal(sub_off["delta"], off["delta"])


def test_fixed_and_trust_switches():
    x, r, o = _rand_setup(8)
    fixed = mars_strength(x, r, 1.0, -1.0, o, adaptive=False, trust_region=False, alpha=2.5)
    assert torch.all(fixed["alpha"] == 2.5)  # no gate: harmless rows get it too
    assert torch.all(torch.isinf(fixed["cap"]))
    torch.testing.assert_close(fixed["delta"], 2.5 * r.expand_as(x), rtol=0, atol=0)
    capped = mars_strength(x, r, 1.0, -1.0, o, adaptive=False, trust_region=True, alpha=2.5, margin=0.0)
    torch.testing.assert_close(capped["alpha"], torch.clamp(torch.relu(1.0 - x @ r), max=2.5))
    ungated = mars_strength(x, r, 1.0, -1.0, o, trust_region=False, gain=1.0, gain_units="abs", tau=0.0)
    torch.testing.assert_close(ungated["alpha"], torch.relu(ungated["score"]))
    gap_units = mars_strength(x, r, 1.0, -1.0, o, trust_region=False, gain=1.0, gain_units="gap", tau=0.0)
    torch.testing.assert_close(gap_units["alpha"], 2.0 * torch.relu(gap_units["score"]))


def test_float32_and_bfloat16_inputs():
    x, r, o = _rand_setup(9)
    ref = mars_strength(x, r, 1.0, -1.0, o)
    for dt in (torch.float32, torch.bfloat16):
        res = mars_strength(x.to(dt), r.to(dt), 1.0, -1.0, o)
        assert res["alpha"].dtype == torch.float64
        assert torch.allclose(res["alpha"], ref["alpha"], atol=0.1)


def test_bad_arguments():
    x, r, o = _rand_setup(1)
    with pytest.raises(InputError):
        mars_strength(x, r, 1.0, 0.0, o, offset_mode="nope")
    with pytest.raises(InputError):
        mars_strength(x, r, 1.0, 0.0, o, gain_units="nope")
    with pytest.raises(InputError):
        ActAdd(torch.zeros(4), 0, 1.0)
    with pytest.raises(InputError):
        ActAdd(torch.ones(4), 0, 1.0, scope="sometimes")


# ============================================================================ calibration (synthetic)
def _synthetic_calibration(n_layers=4, d=64, seed=0, layers_path=None, modalities=("image", "video")):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    r = r / r.norm(dim=-1, keepdim=True)
    p_safe = torch.randn(n_layers, generator=g, dtype=torch.float64)
    p_harm = p_safe + torch.rand(n_layers, generator=g, dtype=torch.float64) + 0.1
    offs = {m: torch.randn(n_layers, d, generator=g, dtype=torch.float64) for m in modalities}
    return MarsCalibration(tuple(range(n_layers)), r, p_harm, p_safe, offs, n_layers, d, layers_path=layers_path,
                           provenance={"model_id": "synthetic"})


def test_calibration_roundtrip_bit_exact_and_refuses_mismatch(tmp_path):
    cal = _synthetic_calibration(layers_path="model.language_model.layers")
    p = cal.save(tmp_path / "cal.safetensors")
    back = MarsCalibration.load(p)
    assert back.layers == cal.layers and back.pos == cal.pos and back.layers_path == cal.layers_path
    for name in ("direction", "p_harm", "p_safe"):
        assert torch.equal(getattr(back, name), getattr(cal, name))
    assert set(back.offsets) == {"image", "video"}
    for m in cal.offsets:
        assert torch.equal(back.offsets[m], cal.offsets[m])
    assert back.provenance == cal.provenance
    tiny = build_tiny("llava")  # 4 layers, d_model 64
    MarsCalibration.load(p, model=tiny.model)
    wrong = _synthetic_calibration(d=32)
    p2 = wrong.save(tmp_path / "wrong.safetensors")
    with pytest.raises(IncompatibleModelError):
        MarsCalibration.load(p2, model=tiny.model)
    with pytest.raises(IncompatibleModelError):
        wrong.check_model(tiny.model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError):
        MarsCalibration.load(tmp_path / "junk.safetensors")
    with pytest.raises(ArtifactError):
        MarsCalibration.load(tmp_path / "missing.safetensors")


def test_calibration_rejects_degenerate_gap():
    cal = _synthetic_calibration()
    with pytest.raises(Exception, match="p_harm <= p_safe"):
        MarsCalibration(cal.layers, cal.direction, cal.p_safe, cal.p_harm, {}, cal.n_layers, cal.d_model)


def test_neutral_media_shapes():
    ims = neutral_images(4, 20, seed=1)
    assert all(im.shape == (20, 20, 3) and im.dtype == np.uint8 for im in ims)
    assert len(np.unique(ims[0].reshape(-1, 3), axis=0)) == 1  # solid colour
    assert len(np.unique(ims[1].reshape(-1, 3), axis=0)) > 100  # noise
    vids = neutral_videos(2, 16, frames=4, seed=1)
    assert vids[0].shape == (4, 16, 16, 3) and vids[0].dtype == np.uint8
    assert len(np.unique(vids[0].reshape(-1, 3), axis=0)) == 1


# ============================================================================ tiny models
@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            tiny = build_tiny(family)
            cache[family] = load_model(tiny.model, tiny.processor or tiny.tokenizer)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def directions(models):
    from mars_core.directions import RefusalDirections

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = RefusalDirections.extract(models(family), HARM, SAFE)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def calibrations(models, directions):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = calibrate_mars(models(family), directions(family), n_neutral=4)
        return cache[family]

    return get


def _media(family, n, kind="image"):
    if kind == "video":
        return {"videos": [make_video(i) for i in range(n)]}
    return {"images": [make_image(i) for i in range(n)]}


def _hidden_last(mm, batch):
    """[n_layers, batch, d] outputs of every decoder layer at the last column (transformers forward)."""
    with torch.no_grad():
        out = mm.hf(**batch.inputs, output_hidden_states=True)
    return torch.stack([h[:, -1] for h in out.hidden_states[1:]]).to(torch.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_matches_hidden_states_reference(family, models, directions, calibrations):
    mm, d, cal = models(family), directions(family), calibrations(family)
    assert cal.layers == tuple(range(mm.n_layers)) and cal.layers_path == mm.family.layers_path
    from mars_core.steering import neutral_sets

    text, media = neutral_sets(mm, ["image"], 4, seed=0)
    bi = mm.build_batch(media["image"].texts, images=media["image"].images)
    bt = mm.build_batch(text.texts)
    hi, ht = _hidden_last(mm, bi), _hidden_last(mm, bt)
    for l in range(mm.n_layers - 1):  # the last hidden state has the final norm applied
        ref = hi[l].mean(0) - ht[l].mean(0)
        torch.testing.assert_close(cal.offsets["image"][l], ref, rtol=0, atol=1e-5)
        r = d.direction(l)
        mh, ms = d.centroids(l)
        torch.testing.assert_close(cal.direction[l], r, rtol=0, atol=0)
        assert float(cal.p_harm[l]) == pytest.approx(float(mh @ r), abs=1e-12)
        assert float(cal.p_safe[l]) == pytest.approx(float(ms @ r), abs=1e-12)
    if mm.supports_video:
        assert "video" in cal.offsets


def test_media_side(models):
    assert media_side(models("llava")) == 32
    assert media_side(models("gemma3")) == 32
    assert media_side(models("qwen2_5_vl")) == 56  # min_pixels 3136 = 56 * 56
    assert media_side(models("llama"), default=224) == 224  # text-only: the given default
    with pytest.raises(InputError, match="give size="):
        media_side(models("llama"))


def _tf_inputs(batch, ids):
    """Inputs for a teacher-forced forward over prompt + generated[:-1]."""
    T = batch.seq_len
    full = ids[:, :-1]
    extra = full.shape[1] - T
    out = {}
    for k, v in batch.inputs.items():
        if k == "input_ids":
            out[k] = full
        elif v.dim() == 2 and v.shape == batch.inputs["input_ids"].shape:
            pad = torch.ones if k == "attention_mask" else torch.zeros
            out[k] = torch.cat([v, pad(v.shape[0], extra, dtype=v.dtype)], 1)
        else:
            out[k] = v
    return out


def _steered_generate_logits(mm, batch, steerer, K):
    """Per-step logits [B, K, V] of a steered generate, read in the same invoke: first-token
    steerers through apply() before the step loop, per-step ones through step() inside it."""
    with torch.no_grad():
        with mm.nn.generate(batch.inputs, max_new_tokens=K, min_new_tokens=K, do_sample=False) as tracer:
            rec = nnsight.save({})
            logits = nnsight.save([])
            if steerer.scope == "every":
                for _ in tracer.iter[:K]:
                    steerer.step(mm, batch, record=rec)
                    logits.append(mm.logits_envoy.output[:, -1].clone())
            else:
                steerer.apply(mm, batch, record=rec)
                for _ in tracer.iter[:K]:
                    logits.append(mm.logits_envoy.output[:, -1].clone())
            ids = nnsight.save(tracer.result)
    return torch.stack(logits, 1), ids, rec


def _tf_logits(mm, batch, ids, edits):
    """Teacher-forced logits [B, K, V] at columns T-1 .. T+K-2; edits: {column: (layer, delta [B, d])}."""
    T = batch.seq_len
    K = ids.shape[1] - T
    with torch.no_grad():
        with mm.nn.trace(_tf_inputs(batch, ids)):
            for col, (layer, delta) in sorted(edits.items(), key=lambda kv: (kv[1][0], kv[0])):
                mm.layers[layer].output[:, col] = (mm.layers[layer].output[:, col].to(torch.float64) + delta).to(
                    torch.float32
                )
            lg = nnsight.save(mm.logits_envoy.output[:, T - 1 : T - 1 + K])
    return lg


@pytest.mark.parametrize("family", FAMILIES)
def test_first_token_only_equals_teacher_forced_edit(family, models, calibrations):
    mm, cal = models(family), calibrations(family)
    K, layer = 4, 1
    st_ = MARS(cal, layer, trust_region=False, gain=1.0, gain_units="abs", tau=-5.0)  # gate open, alpha varies
    batch = mm.build_batch(HARM[:2], **_media(family, 2))
    steered, ids, rec = _steered_generate_logits(mm, batch, st_, K)
    plain, _, _ = _steered_generate_logits(mm, batch, NoSteer(), K)
    assert torch.all(rec["alpha"] > 0)
    assert (steered[:, 0] - plain[:, 0]).abs().max() > 1e-3  # the edit does something
    T = batch.seq_len
    # independent alpha: the equations on x read from output_hidden_states at column T-1
    x = _hidden_last(mm, batch)[layer]
    o = cal.offsets["image"][layer]
    ref = ref_mars(x.numpy(), cal.direction[layer].numpy(), float(cal.p_harm[layer]), float(cal.p_safe[layer]),
                   o.numpy(), recenter=True, adaptive=True, trust_region=False, offset_mode="judge", gain=1.0,
                   gain_units="abs", tau=-5.0, margin=0.5, alpha=1.0)
    alpha_ref = torch.tensor([a for a, _, _ in ref], dtype=torch.float64)
    torch.testing.assert_close(rec["alpha"], alpha_ref, rtol=0, atol=1e-5)
    delta = rec["alpha"][:, None] * cal.direction[layer][None, :]
    tf = _tf_logits(mm, batch, ids, {T - 1: (layer, delta)})
    assert (tf - steered).abs().max().item() <= 1e-5
    # later steps untouched: the teacher-forced reference edits column T-1 only; and the unedited
    # teacher-forced forward differs at step 0 (so the comparison has power)
    tf0 = _tf_logits(mm, batch, ids, {})
    assert (tf0[:, 0] - steered[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_every_token_mode(family, models, calibrations):
    mm, cal = models(family), calibrations(family)
    K, layer = 4, 2
    batch = mm.build_batch(HARM[:2], **_media(family, 2))
    first = MARS(cal, layer, adaptive=False, trust_region=False, alpha=2.0)
    every = MARS(cal, layer, adaptive=False, trust_region=False, alpha=2.0, scope="every")
    lf, ids_f, _ = _steered_generate_logits(mm, batch, first, K)
    le, ids_e, rec = _steered_generate_logits(mm, batch, every, K)
    assert torch.equal(le[:, 0], lf[:, 0])
    assert len(rec["alpha_steps"]) == K
    # differs from step 1 on (on the same tokens: compare teacher-forced with first-only edits)
    T = batch.seq_len
    delta = 2.0 * cal.direction[layer][None, :].expand(2, -1)
    tf_first = _tf_logits(mm, batch, ids_e, {T - 1: (layer, delta)})
    for k in range(1, K):
        assert (tf_first[:, k] - le[:, k]).abs().max() > 1e-4
    # and equals a teacher-forced forward with the edit at every generated column
    tf_every = _tf_logits(mm, batch, ids_e, {T - 1 + k: (layer, delta) for k in range(K)})
    assert (tf_every - le).abs().max().item() <= 1e-5
    # the convenience generate (apply with steps=K, in its own invoke) gives the same tokens
    out = every.generate(mm, HARM[:2], max_new_tokens=K, min_new_tokens=K, **_media(family, 2))
    assert torch.equal(out.token_ids, ids_e[:, T:])
    assert len(out.record["alpha_steps"]) == K


@pytest.mark.parametrize("scope", ["first", "every"])
def test_fixed_mode_equals_actadd(scope, models, calibrations):
    mm, cal = models("llava"), calibrations("llava")
    K, layer = 3, 1
    batch = mm.build_batch(HARM[:2], **_media("llava", 2))
    fixed = MARS(cal, layer, adaptive=False, trust_region=False, alpha=1.7, scope=scope)
    act = ActAdd(cal.direction[layer], layer, 1.7, scope=scope)
    a, ia, ra = _steered_generate_logits(mm, batch, fixed, K)
    b, ib, rb = _steered_generate_logits(mm, batch, act, K)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert torch.equal(ra["alpha"], rb["alpha"])
    # and recenter does not matter in fixed mode with the cap off (the gate is off)
    c, _, _ = _steered_generate_logits(mm, batch, MARS(cal, layer, adaptive=False, trust_region=False, alpha=1.7,
                                                       scope=scope, recenter=False), K)
    assert torch.equal(a, c)


def test_recenter_switch_on_model(models, calibrations):
    mm, cal = models("qwen2_5_vl"), calibrations("qwen2_5_vl")
    layer = 2
    batch = mm.build_batch(HARM[:3], **_media("qwen2_5_vl", 3))
    _, on = MARS(cal, layer).last_logits(mm, batch)
    _, off = MARS(cal, layer, recenter=False).last_logits(mm, batch)
    o, r = cal.offsets["image"][layer], cal.direction[layer]
    torch.testing.assert_close(on["proj"], off["proj"], rtol=0, atol=1e-6)
    torch.testing.assert_close(on["proj_c"], on["proj"] - o @ r, rtol=0, atol=1e-9)
    torch.testing.assert_close(off["proj_c"], off["proj"], rtol=0, atol=0)
    # a text batch is never re-centred
    tb = mm.build_batch(HARM[:3])
    _, t_on = MARS(cal, layer).last_logits(mm, tb)
    torch.testing.assert_close(t_on["proj_c"], t_on["proj"], rtol=0, atol=0)


@pytest.mark.parametrize("family,kind", [("llava", "image"), ("qwen2_5_vl", "image"), ("qwen2_5_vl", "video"),
                                         ("gemma3", "image"), ("gemma3", "text")])
def test_apply_and_generate_on_tiny_models(family, kind, models, calibrations):
    mm, cal = models(family), calibrations(family)
    media = {} if kind == "text" else _media(family, 2, kind)
    st_ = MARS(cal, 1, tau=-5.0)
    out = st_.generate(mm, HARM[:2], max_new_tokens=3, **media)
    assert isinstance(out, Generations) and len(out) == 2 and all(isinstance(s, str) for s in out)
    assert out.alpha.shape == (2,) and out.token_ids.shape == (2, 3)
    assert torch.all(out.alpha <= out.record["cap"])
    # apply inside a user's own trace, with a read after it; nothing recorded unless asked
    batch = mm.build_batch(HARM[:2], **media)
    with torch.no_grad():
        with mm.nn.trace(batch.inputs):
            none = nnsight.save([st_.apply(mm, batch) is None])
            h = nnsight.save(mm.layers[2].output[:, -1])
    assert none == [True] and h.shape == (2, mm.d_model)
    # bare nnsight model + modality string (the remote-friendly form) gives the same logits
    l1, r1 = st_.last_logits(mm, batch)
    with torch.no_grad():
        with mm.nn.trace(batch.inputs):
            rec = st_.apply(mm.nn, batch.modality, record=True)
            l2 = nnsight.save(mm.logits_envoy.output[:, -1])
    assert torch.equal(l1, l2) and torch.equal(r1["alpha"], rec["alpha"])


def test_nosteer_equals_plain_generate(models):
    mm = models("llava")
    imgs = [make_image(0), make_image(1)]
    out = NoSteer().generate(mm, HARM[:2], images=imgs, max_new_tokens=4)
    batch = mm.build_batch(HARM[:2], images=imgs)
    with torch.no_grad():
        ref = mm.hf.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.token_ids, ref[:, batch.seq_len :])
    assert out.alpha is None


def test_generate_survives_early_stop(models, calibrations):
    """Every-token mode with a generation that stops before max_new_tokens: the record is kept."""
    mm, cal = models("llava"), calibrations("llava")
    st_ = MARS(cal, 1, adaptive=False, trust_region=False, alpha=2.0, scope="every")
    first = st_.generate(mm, HARM[:1], images=[make_image(0)], max_new_tokens=1)
    eos = int(first.token_ids[0, 0])
    out = st_.generate(mm, HARM[:1], images=[make_image(0)], max_new_tokens=6, eos_token_id=eos)
    assert out.token_ids.shape[1] == 1
    assert out.alpha.tolist() == [2.0] and len(out.record["alpha_steps"]) == 1


def test_every_scope_needs_steps(models, calibrations):
    mm, cal = models("llava"), calibrations("llava")
    batch = mm.build_batch(HARM[:1])
    with pytest.raises(InputError, match="steps"):
        with mm.nn.trace(batch.inputs):
            MARS(cal, 1, scope="every").apply(mm, batch)


def test_missing_modality_offset(models, directions):
    mm = models("llava")
    cal = calibrate_mars(mm, directions("llava"), modalities=(), n_neutral=2)
    batch = mm.build_batch(HARM[:1], images=[make_image(0)])
    with pytest.raises(InputError, match="offset"):
        MARS(cal, 1).last_logits(mm, batch)
    MARS(cal, 1, recenter=False).last_logits(mm, batch)


def test_directional_ablation_removes_direction_every_step(models, directions):
    mm = models("llava")
    r = directions("llava").direction(1)
    abl = DirectionalAblation(r)
    batch = mm.build_batch(HARM[:2], images=[make_image(0), make_image(1)])
    K = 3
    with torch.no_grad():
        with mm.nn.generate(max_new_tokens=K, min_new_tokens=K, do_sample=False) as tracer:
            with tracer.invoke(batch.inputs):
                abl.apply(mm, batch, steps=K)
            with tracer.invoke():  # a second worker reads what the first one wrote, every step
                projs = nnsight.save([])
                for _ in tracer.iter[:K]:
                    projs.append(torch.stack([(mm.layers[i].output.to(torch.float64) @ r).abs().max()
                                              for i in range(mm.n_layers)]))
    assert len(projs) == K
    assert max(float(p.max()) for p in projs) < 1e-5
    with torch.no_grad():
        with mm.nn.trace(batch.inputs):
            plain = nnsight.save(torch.stack([(mm.layers[i].output.to(torch.float64) @ r).abs().max()
                                              for i in range(mm.n_layers)]))
    assert float(plain.max()) > 1e-3


def test_select_mars_layer(models, calibrations):
    mm, cal = models("llava"), calibrations("llava")
    layer, ds = select_mars_layer(mm, cal, HARM, n_neutral=2, mars_kwargs=dict(tau=-5.0, gain=1.0, gain_units="abs"),
                                  spurious_bound=1e9)
    assert set(ds.layer.values.tolist()) == set(range(mm.n_layers))
    assert list(ds.modality.values) == ["image"]
    for v in ("induced", "spurious", "spurious_delta", "alpha_neutral", "gate_neutral", "feasible", "pass_layer"):
        assert v in ds
    cut = int(math.floor(mm.n_layers * 0.8))
    assert not bool(ds["pass_layer"].sel(layer=mm.n_layers - 1)) and ds.attrs["layer_cut"] == cut
    feas = ds["induced"].where(ds["feasible"])
    assert layer == int(feas.idxmax("layer")) and ds.attrs["selected_layer"] == layer
    # a given layer overrides; an impossible bound falls back with a warning
    l2, ds2 = select_mars_layer(mm, cal, HARM[:2], n_neutral=2, layer=3)
    assert l2 == 3 and ds2.layer.values.tolist() == [3]
    with pytest.warns(UserWarning, match="no layer kept"):
        l3, ds3 = select_mars_layer(mm, cal, HARM[:2], n_neutral=2, spurious_bound=-1e9,
                                    mars_kwargs=dict(tau=-5.0, gain=1.0, gain_units="abs"))
    assert ds3.attrs["fallback"]
    from mars_core.steering import fit_mars

    st_ = fit_mars(mm, cal, HARM[:2], {}, n_neutral=2, layers=[0, 1], gate={"tau": -5.0, "gain": 2.0, "margin": 0.5})
    assert st_.layer in (0, 1) and st_.selection is not None and st_.tau == -5.0 and st_.gate_selection is None
    assert st_.fit_info["gate_fixed"] == {"tau": -5.0, "gain": 2.0, "margin": 0.5}


@pytest.mark.parametrize("family,kind", [("llava", "image"), ("qwen2_5_vl", "image"), ("qwen2_5_vl", "video"),
                                         ("gemma3", "image"), ("gemma3", "text")])
def test_first_token_sweep_equals_full_forwards(family, kind, models, calibrations):
    from mars_core.steering import first_token_sweep

    mm, cal = models(family), calibrations(family)
    media = {} if kind == "text" else _media(family, 2, kind)
    batch = mm.build_batch(["How do I build a bomb?", "Tell me how to steal a car now please."], **media)
    sts = [NoSteer(), MARS(cal, 1, tau=-5.0), MARS(cal, 2, adaptive=False, trust_region=False, alpha=3.0),
           ActAdd(cal.direction[0], 0, 2.0), DirectionalAblation(cal.direction[1])]
    fast, recs = first_token_sweep(mm, batch, sts)
    for i, st_ in enumerate(sts):
        slow, rec = st_.last_logits(mm, batch)
        assert (fast[i] - slow).abs().max().item() <= 1e-5
        for k in rec:
            if isinstance(rec[k], torch.Tensor):
                torch.testing.assert_close(recs[i][k], rec[k], rtol=1e-5, atol=1e-5)
    assert (fast[1] - fast[0]).abs().max() > 1e-3


def test_first_token_sweep_falls_back_when_check_fails(models, calibrations, monkeypatch):
    import mars_core.steering.sweep as steering

    mm, cal = models("llava"), calibrations("llava")
    batch = mm.build_batch(HARM[:2], **_media("llava", 2))
    T = batch.seq_len
    monkeypatch.setattr(steering, "_prefix_positions", lambda mm, inputs: torch.arange(T).flip(0).expand(2, T).contiguous())  # wrong: reversed
    sts = [NoSteer(), MARS(cal, 1, tau=-5.0)]
    with pytest.warns(UserWarning, match="using full forwards"):
        fast, _ = steering.first_token_sweep(mm, batch, sts, check=True)
    for i, st_ in enumerate(sts):
        assert torch.equal(fast[i], st_.last_logits(mm, batch)[0])


def test_prefix_cache_is_verified_once_per_kind_of_batch(models, calibrations, monkeypatch):
    """check="once": the first batch of each kind (media keys, left padding) per model runs the
    full-forward check, later ones reuse the verdict; check=True always runs it; a failed verdict
    sends later batches of that kind to full forwards too."""
    import mars_core.steering.sweep as sweep
    from mars_core.steering.baselines import NoSteer as NS

    mm, cal = models("llava"), calibrations("llava")
    monkeypatch.setattr(sweep, "_VERIFIED", sweep.weakref.WeakKeyDictionary())
    calls = []
    orig = NS.last_logits
    monkeypatch.setattr(NS, "last_logits", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    img = mm.build_batch(HARM[:2], **_media("llava", 2))
    img2 = mm.build_batch(HARM[2:4], **_media("llava", 2))
    txt = mm.build_batch(["Hi", "Tell me how to steal a car now please."])  # left padded, no media
    assert sweep.prefix_kind(img.inputs) != sweep.prefix_kind(txt.inputs)
    for b, want in ((img, 1), (img2, 1), (txt, 2), (img, 2)):
        assert sweep.PrefixCache(mm, b).ok
        assert len(calls) == want
    sweep.PrefixCache(mm, img2, check=True)
    assert len(calls) == 3
    sweep._VERIFIED[mm][sweep.prefix_kind(img.inputs)] = False  # as after a failed check
    pc = sweep.PrefixCache(mm, img2)
    st_ = MARS(cal, 1, tau=-5.0)
    assert not pc.ok and pc.cache is None and pc.nbytes == 0  # no prefill for a kind that failed
    assert torch.equal(pc.logits(st_)[0], st_.last_logits(mm, img2)[0])
    with pytest.raises(InputError, match="check="):
        sweep.PrefixCache(mm, img, check="always")


def test_prefix_store_keys_by_content_and_fit_prefills_each_batch_once(models, calibrations, monkeypatch):
    """PrefixStore: a batch built again from the same prompts and media is a hit (same cache), other
    prompts or other media a miss; first_token_sweep over it equals the sweep without it.
    fit_mars with a store prefills each distinct batch once over both layer passes and the gate,
    a second fit on the same prompts prefills nothing, and both equal full forwards' choice."""
    import mars_core.steering.sweep as sweep
    from mars_core.prompts import PromptSet
    from mars_core.steering import PrefixStore, fit_mars, first_token_sweep

    mm, cal = models("llava"), calibrations("llava")
    other_mm = models("qwen2_5_vl")
    store = PrefixStore(mm)
    a = mm.build_batch(HARM[:2], **_media("llava", 2))
    a2 = mm.build_batch(HARM[:2], **_media("llava", 2))
    b = mm.build_batch(HARM[2:4], **_media("llava", 2))
    assert store.get(a) is store.get(a2) and (store.hits, store.misses) == (1, 1)
    assert store.get(b) is not store.get(a) and len(store) == 2 and store.nbytes == store.get(a).nbytes * 2
    assert sweep.batch_key(a) != sweep.batch_key(mm.build_batch(HARM[:2]))  # same texts, no image
    sts = [NoSteer(), MARS(cal, 1, tau=-5.0)]
    torch.testing.assert_close(first_token_sweep(mm, a, sts, store=store)[0], first_token_sweep(mm, a, sts)[0],
                               rtol=0, atol=0)
    with pytest.raises(InputError, match="another model"):
        first_token_sweep(other_mm, other_mm.build_batch(HARM[:2]), sts, store=store)
    with pytest.raises(InputError, match="another model"):
        fit_mars(other_mm, cal, HARM[:2], {}, prefix_store=store)

    prefills = []
    orig = sweep._prefill
    monkeypatch.setattr(sweep, "_prefill", lambda mm_, pre: prefills.append(1) or orig(mm_, pre))
    safe = {"text": PromptSet("text", ["Write a poem about the sea.", "Name three fruits."]),
            "image": PromptSet("image", ["Describe this picture.", "What colour is it?"], images=_media("llava", 2)["images"])}
    kw = dict(n_neutral=2, layers=[0, 1, 2], taus=[0.0, 0.5], gains=[2.0], margins=[0.5], batch_size=2)
    fit_store = PrefixStore(mm)
    fast = fit_mars(mm, cal, HARM[:2], safe, prefix_store=fit_store, **kw)
    n_batches = 1 + 1 + 2  # harmful text, neutral images, two safe sets (one batch each)
    assert len(fit_store) == n_batches and len(prefills) == n_batches and fit_store.hits > 0
    again = fit_mars(mm, cal, HARM[:2], safe, prefix_store=fit_store, **kw)
    assert len(prefills) == n_batches  # nothing prefilled again
    slow = fit_mars(mm, cal, HARM[:2], safe, reuse_prefix=False, **kw)
    assert fast.fit_info == again.fit_info == slow.fit_info
    np.testing.assert_allclose(fast.selection["induced"].values, slow.selection["induced"].values, atol=1e-4)
    np.testing.assert_array_equal(fast.gate_selection["rate"].values, slow.gate_selection["rate"].values)


def test_generate_in_chunks_equals_per_chunk(models, calibrations):
    mm, cal = models("llava"), calibrations("llava")
    st_ = MARS(cal, 1, tau=-5.0)
    imgs = [make_image(i) for i in range(3)]
    out = st_.generate(mm, HARM[:3], images=imgs, max_new_tokens=3, batch_size=2)
    a = st_.generate(mm, HARM[:2], images=imgs[:2], max_new_tokens=3)
    b = st_.generate(mm, HARM[2:3], images=imgs[2:], max_new_tokens=3)
    assert list(out) == list(a) + list(b)
    assert torch.equal(out.alpha, torch.cat([a.alpha, b.alpha]))
    assert out.token_ids.shape == (3, 3) and len(out.record["chunks"]) == 2


def test_neutral_calibration_offsets_equal_mean_differences(models, directions):
    """o_image = mean(neutral image requests) - mean(neutral text requests), by hand from per-prompt rows."""
    from mars_core import collect_activations
    from mars_core.prompts import PromptSet
    from mars_core.steering import neutral_calibration

    mm, dirs = models("llava"), directions("llava")
    texts = ["Describe this image.", "What is in this picture?", "Describe it."]
    text_set = PromptSet("neutral_text", texts)
    image_set = PromptSet("neutral_image", texts, images=[make_image(seed=i) for i in range(3)])
    calib = neutral_calibration(mm, dirs, text_set, {"image": image_set}, batch_size=2)
    rows = lambda **kw: collect_activations(mm, texts, positions="last", reduce="none", **kw)["acts"]  # noqa: E731
    ref = (rows(images=image_set.images).values.astype("float64").mean(0)
           - rows().values.astype("float64").mean(0))[:, -1]  # [layer, d_model]
    for layer in range(mm.n_layers):
        got = calib.at(layer)["offsets"]["image"].numpy()
        assert np.abs(got - ref[layer]).max() < 1e-5
    assert calib.provenance["neutral_image_sha256"] == image_set.sha256
    from mars_core.organism import load_organism

    organism = load_model(*load_organism("natural"))  # d_model 128, the tiny llava's directions have 64
    assert organism.d_model != mm.d_model
    with pytest.raises(IncompatibleModelError, match="extract directions for this model"):
        neutral_calibration(organism, dirs, text_set, {"image": image_set})
