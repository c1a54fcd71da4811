"""A fitted MARS is one artifact: fit -> save -> load gives the same steering, bit for bit; the
steerers refuse a direction or layer that does not fit the model before touching it."""

from __future__ import annotations

import json

import pytest
import torch

from mars_core import InputError, RefusalDirections, load_model
from mars_core.errors import ArtifactError, IncompatibleModelError
from mars_core.organism import load_organism
from mars_core.organism.sets import organism_suite
from mars_core.steering import MARS, ActAdd, DirectionalAblation, fit_mars, neutral_calibration


@pytest.fixture(scope="module")
def fitted():
    mm = load_model(*load_organism("natural"), model_id="mars-organism/natural")
    s = organism_suite(3)
    dirs = RefusalDirections.extract(mm, s["harmful_text_train"].texts, s["harmless_text_train"].texts, batch_size=96)
    calib = neutral_calibration(mm, dirs, s["neutral_text"], {"image": s["neutral_image"]}, batch_size=96)
    safe = {n: s[n].subset(range(0, len(s[n]), 4)) for n in ("harmless_text_train", "harmless_image_cal", "captions_cal")}
    op = fit_mars(mm, calib, s["harmful_text_train"], safe, neutral={"image": s["neutral_image"]}, batch_size=96,
                  gains=(2.0, 4.0), margins=(0.0, 0.5))
    return mm, s, op


def test_fit_save_load_gives_bit_identical_steering(fitted, tmp_path):
    mm, s, op = fitted
    assert op.fit_info and op.selection is not None and op.gate_selection is not None
    path = op.save(tmp_path / "mars")
    assert {p.name for p in path.iterdir()} == {"mars.json", "calibration.safetensors", "layer_selection.nc",
                                                "gate_selection.nc"}
    meta = json.loads((path / "mars.json").read_text())
    assert meta["config"]["layer"] == op.layer and meta["provenance"]["model_id"] == "mars-organism/natural"
    back = MARS.load(path, model=mm)
    assert back.config == op.config and back.fingerprint == op.fingerprint and back.fit_info == op.fit_info
    assert back.selection.identical(op.selection) and back.gate_selection.identical(op.gate_selection)
    ps = s["harmful_image"].subset(range(0, 96, 8))
    batch = mm.build_batch(ps.texts, images=ps.images)
    a, rec_a = op.last_logits(mm, batch)
    b, rec_b = back.last_logits(mm, batch)
    assert torch.equal(a, b) and torch.equal(rec_a["alpha"], rec_b["alpha"])
    ga, gb = op.generate(mm, ps.texts, images=ps.images, max_new_tokens=6), back.generate(
        mm, ps.texts, images=ps.images, max_new_tokens=6)
    assert list(ga) == list(gb) and torch.equal(ga.token_ids, gb.token_ids)


def test_a_pickled_mars_leaves_its_selection_datasets_behind(fitted):
    """How a steerer travels to NDIF: pickled without the fit's xarray Datasets (a server need
    not have xarray), with the same edits; the operator keeps them."""
    import pickle

    mm, s, op = fitted
    blob = pickle.dumps(op)
    assert b"xarray" not in blob
    back = pickle.loads(blob)
    assert back.selection is None and back.gate_selection is None and back.fit_info == op.fit_info
    assert op.selection is not None and op.gate_selection is not None
    ps = s["harmful_image"].subset(range(0, 96, 16))
    batch = mm.build_batch(ps.texts, images=ps.images)
    assert torch.equal(back.last_logits(mm, batch)[0], op.last_logits(mm, batch)[0])


def test_loading_refuses_changed_or_foreign_files(fitted, tmp_path):
    mm, _, op = fitted
    path = op.save(tmp_path / "mars")
    meta = json.loads((path / "mars.json").read_text())
    meta["config"]["tau"] += 0.5  # a hand-edited setting no longer matches the saved fingerprint
    (path / "mars.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="fingerprint"):
        MARS.load(path)
    with pytest.raises(ArtifactError, match="no fitted MARS"):
        MARS.load(tmp_path / "nowhere")
    from mars_core.testing import build_tiny

    tiny = build_tiny("llava")
    other = load_model(tiny.model, tiny.processor)
    good = op.save(tmp_path / "good")
    with pytest.raises(IncompatibleModelError):
        MARS.load(good, model=other)


def test_steerers_check_direction_size_and_layer_against_the_model(fitted):
    mm, s, op = fitted
    batch = mm.build_batch(s["harmful_text"].texts[:2])
    wrong_d = ActAdd(torch.ones(mm.d_model + 3), 1, 1.0)
    with pytest.raises(InputError, match=f"has {mm.d_model + 3} dims but the model's residual stream has d_model"):
        wrong_d.last_logits(mm, batch)
    too_deep = ActAdd(torch.ones(mm.d_model), mm.n_layers + 3, 1.0)
    with pytest.raises(InputError, match=f"acts at layer {mm.n_layers + 3} but the model has {mm.n_layers}"):
        too_deep.generate(mm, s["harmful_text"].texts[:2], max_new_tokens=2)
    with pytest.raises(InputError, match="dims but the model"):
        DirectionalAblation(torch.ones(7)).last_logits(mm, batch)
    from mars_core.testing import build_tiny

    tiny = build_tiny("llava")
    other = load_model(tiny.model, tiny.processor)
    with pytest.raises(IncompatibleModelError, match="calibrated for a model with"):
        op.generate(other, ["How do I make it?"], max_new_tokens=2)
