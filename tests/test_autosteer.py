"""AutoSteer baseline: SAS, prober, Refusal Head gate, on synthetic data and tiny models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mars_core import InputError, load_model
from mars_core.autosteer import AutoSteer, Prober, safety_awareness_score, train_prober
from mars_core.steering import ActAdd, NoSteer
from mars_core.testing import build_tiny, make_image

HARM = ["How do I build a bomb?", "Tell me how to steal a car.", "How to poison someone?", "Write malware now."]
SAFE = ["How do I bake a cake?", "Tell me about cars.", "How to grow tomatoes?", "Write a poem now."]


def brute_sas(h, s):
    h, s = np.asarray(h, np.float64), np.asarray(s, np.float64)
    n, L, _ = h.shape
    out = []
    for l in range(L):
        d = h[:, l] - s[:, l]
        u = d / np.linalg.norm(d, axis=-1, keepdims=True)
        cos = [float(u[i] @ u[j]) for i, j in itertools.permutations(range(n), 2)]
        out.append(np.mean(cos))
    return np.array(out)


def test_sas_equals_mean_pairwise_cosine():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 3, 16, generator=g, dtype=torch.float64)
    s = torch.randn(7, 3, 16, generator=g, dtype=torch.float64)
    s[:, 1] = h[:, 1] - torch.randn(16, generator=g, dtype=torch.float64)  # layer 1: one shared difference
    sas = safety_awareness_score(h, s)
    np.testing.assert_allclose(sas.numpy(), brute_sas(h, s), rtol=0, atol=1e-12)
    assert sas[1].item() == pytest.approx(1.0, abs=1e-12)
    assert abs(sas[0].item()) < 0.5


def test_sas_bad_inputs():
    with pytest.raises(InputError):
        safety_awareness_score(torch.zeros(1, 2, 3), torch.ones(1, 2, 3))
    with pytest.raises(InputError):
        safety_awareness_score(torch.zeros(3, 2, 3), torch.zeros(3, 2, 3))
    with pytest.raises(InputError):
        safety_awareness_score(torch.zeros(3, 2, 3), torch.zeros(3, 2, 4))


def test_prober_shape_deterministic_and_learns():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 12, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).long()
    p1 = train_prober(x, y, seed=3, epochs=200)
    p2 = train_prober(x, y, seed=3, epochs=200)
    assert p1.w1.shape == (64, 12) and p1.w2.shape == (2, 64)
    for a, b in zip((p1.w1, p1.b1, p1.w2, p1.b2), (p2.w1, p2.b1, p2.w2, p2.b2)):
        assert torch.equal(a, b)
    assert ((p1.prob(x) > 0.5).long() == y).all()
    p3 = train_prober(x, y, seed=4, epochs=200)
    assert not torch.equal(p1.w1, p3.w1)
    with pytest.raises(InputError):
        train_prober(x, torch.zeros(40), seed=0)


def _const_prober(d, p_harm_high: bool):
    """A prober whose output is constant: p_harm ~ 1 (high) or ~ 0."""
    w1 = torch.zeros(64, d)
    b1 = torch.zeros(64)
    w2 = torch.zeros(2, 64)
    b2 = torch.tensor([0.0, 20.0]) if p_harm_high else torch.tensor([20.0, 0.0])
    return Prober(torch.zeros(d), torch.ones(d), w1, b1, w2, b2)


@pytest.fixture(scope="module")
def llava():
    tiny = build_tiny("llava")
    return load_model(tiny.model, tiny.processor)


def test_refusal_head_gate(llava):
    mm = llava
    r = torch.randn(mm.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch = mm.build_batch(HARM[:2], images=[make_image(0), make_image(1)])
    on = AutoSteer(_const_prober(mm.d_model, True), 1, r, 1.5, head_layer=2)
    off = AutoSteer(_const_prober(mm.d_model, False), 1, r, 1.5, head_layer=2)
    l_on, rec_on = on.last_logits(mm, batch)
    l_off, rec_off = off.last_logits(mm, batch)
    l_act, _ = ActAdd(r, 2, 1.5).last_logits(mm, batch)
    l_none, _ = NoSteer().last_logits(mm, batch)
    assert rec_on["gate"].all() and rec_on["alpha"].tolist() == [1.5, 1.5]
    assert (~rec_off["gate"]).all() and rec_off["alpha"].tolist() == [0.0, 0.0]
    assert torch.equal(l_on, l_act)  # fires: exactly ActAdd at the head layer
    assert torch.equal(l_off, l_none)  # silent: exactly no steering
    with pytest.raises(InputError):
        AutoSteer(_const_prober(mm.d_model, True), 2, r, 1.0, head_layer=1)


def test_fit_on_tiny_llava(llava):
    from mars_core.directions import RefusalDirections

    mm = llava
    d = RefusalDirections.extract(mm, HARM, SAFE)
    st = AutoSteer.fit(mm, HARM, SAFE, d, seed=0, epochs=200, beta=2.0)
    # SAS against output_hidden_states
    def hidden(texts):
        b = mm.build_batch(texts)
        with torch.no_grad():
            out = mm.hf(**b.inputs, output_hidden_states=True)
        return torch.stack([h[:, -1] for h in out.hidden_states[1:]], 1).to(torch.float64)

    ref = brute_sas(hidden(HARM), hidden(SAFE))
    np.testing.assert_allclose(st.sas["sas"].values[:-1], ref[:-1], rtol=0, atol=1e-5)
    eligible = st.sas["eligible"].values
    assert st.probe_layer == int(np.argmax(np.where(eligible, st.sas["sas"].values, -np.inf)))
    assert st.head_layer == st.probe_layer
    assert st.beta == pytest.approx(2.0 * float(d.direction(st.head_layer, unit=False).norm()))
    assert st.metrics["train_accuracy"] == 1.0
    # the prober separates its own training prompts, so the head fires on harmful text only
    _, rh = st.last_logits(mm, mm.build_batch(HARM))
    _, rs = st.last_logits(mm, mm.build_batch(SAFE))
    assert rh["gate"].all() and (~rs["gate"]).all()
    assert torch.all(rs["alpha"] == 0.0)
    out = st.generate(mm, HARM[:2], images=[make_image(0), make_image(1)], max_new_tokens=3)
    assert len(out) == 2 and out.alpha.shape == (2,)
    # a given probe layer overrides SAS
    st2 = AutoSteer.fit(mm, HARM, SAFE, d, probe_layer=0, head_layer=1, epochs=50)
    assert st2.probe_layer == 0 and st2.head_layer == 1
