"""`mars reproduce` on the shipped organism: artifacts, resuming after an interruption, steps keyed
by what they read, and `mars figures` writing exactly the figure set of `mars reproduce`."""

import dataclasses
import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analysis.reproduce as rp
from analysis.cache import StepCache
from analysis.graph import Step, check_graph, dependents, run_steps
from analysis.steps import STEPS, variant_steps
from mars_core.datasets import load_dataset

QUICK = rp.Settings.quick(curve_layers=(1, 2))


def _with_fn(steps, name, fn):
    return [dataclasses.replace(s, fn=fn) if s.name == name else s for s in steps]


@pytest.mark.slow
def test_interrupted_run_resumes_without_recomputing(tmp_path):
    real = next(s.fn for s in STEPS if s.name == "comparison")

    @functools.wraps(real)  # same parameters: the graph passes exactly what comparison reads
    def boom(*a, **k):
        raise KeyboardInterrupt("killed midway")

    study = rp.organism_study(tmp_path, settings=QUICK, log=lambda m: None)
    study.steps = _with_fn(study.steps, "comparison", boom)
    with pytest.raises(KeyboardInterrupt):
        rp.run(study, progress=False)
    first = [(name, how) for name, how, _ in study.cache.events]
    assert first and all(how == "computed" for _, how in first)
    assert "comparison" not in {n for n, _ in first}
    assert not list(tmp_path.glob(".mars_cache/.*tmp"))  # nothing half-written under a cache name

    study2 = rp.organism_study(tmp_path, settings=QUICK, log=lambda m: None)
    written = rp.run(study2, progress=False)
    second = {name: how for name, how, _ in study2.cache.events}
    assert all(second[n] == "reused" for n, _ in first)  # nothing finished is recomputed
    assert second["comparison"] == "computed" and second["variant_offset_study"] == "computed"

    # every dataset of the study, with the contract's dims and full provenance
    for name, dims in {
        "alignment": {"layer", "modality"},
        "refusal_curves": {"method", "modality", "prompt_set", "layer", "strength", "prompt"},
        "spurious_refusal": {"recenter", "strength", "modality", "prompt"},
        "stability": {"checkpoint", "checkpoint_b", "layer", "k"},
        "comparison": {"method", "metric", "bound"},
        "mars_layer_selection": {"layer", "modality"},
        "mars_gate": {"set", "tau", "gain", "margin"},
    }.items():
        ds = load_dataset(written[name])
        assert dims <= set(ds.dims), name
        if name == "stability":  # says how the transplant was measured, not "callable"
            assert ds.attrs["transplant"].startswith("ActAdd at layer") and "judged by" in ds.attrs["transplant"]
        for key in ("mars_version", "created", "model_id", "analysis"):
            assert ds.attrs[key] != "", (name, key)
        assert not str(ds.attrs["model_id"]).startswith("/"), (name, ds.attrs["model_id"])
        for v in ds.data_vars:
            assert ds[v].attrs.get("long_name"), (name, v)
    assert "mars_no_recenter" in load_dataset(written["comparison_offset_variant"])["method"].values
    # every dataset the study writes is documented, and every variable says what it is and its unit
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
    for f in sorted((tmp_path / "data").glob("*.nc")):
        assert f"`{f.name.replace('_offset_', '_<variant>_')}`" in docs, f.name
        ds = load_dataset(f)
        for v in ds.data_vars:
            assert ds[v].attrs.get("long_name"), (f.name, v)
            if ds[v].dtype.kind in "fiu":
                assert ds[v].attrs.get("units"), (f.name, v)
    # the fitted MARS is one artifact: it loads as the operator the comparison used
    from mars_core.steering import MARS

    op = MARS.load(written["mars"])
    cmp = load_dataset(written["comparison"])
    assert cmp.attrs["layer"] == op.layer and cmp.attrs["mars_gate"] == op.gate
    table = json.loads(written["comparison.json"].read_text())
    assert table["methods"][0] == "none" and "| mars |" in written["comparison.md"].read_text()

    # `mars figures` on the same output writes exactly the same figure and table files
    from analysis.cli import main

    figs = tmp_path / "figures"
    made = {p.name for p in figs.iterdir()}
    assert {f"{n}.png" for n in ("alignment", "refusal_curves", "spurious", "stability", "comparison",
                                 "spurious_offset_variant", "comparison_offset_variant", "mars_layer_selection")} <= made
    for p in figs.iterdir():
        p.unlink()
    assert main(["figures", "--out", str(tmp_path)]) == 0
    assert {p.name for p in figs.iterdir()} == made

    # the model cards are written from these outputs only: their numbers are the datasets'
    from analysis.cards import write_cards

    nat, off = write_cards([tmp_path], names=["quick"], out=tmp_path / "cards")
    card = nat.read_text()
    h = load_dataset(written["heldout"])
    r = h["rate"].sel({"method": "none", "set": "harmful_image", "verdict": "refusal"}).values
    assert f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]" in card and f"| MARS layer (`fit_mars`) | {op.layer}" in card
    v = load_dataset(written["comparison_offset_variant"])["value"].sel({"method": "mars", "metric": "harmless_image"})
    assert f"{float(v[0]):.2f} [{float(v[1]):.2f}, {float(v[2]):.2f}]" in off.read_text()

    # --fresh recomputes everything
    study3 = rp.organism_study(tmp_path, fresh=True, settings=QUICK, log=lambda m: None)
    rp.run(study3, figures=False, progress=False)
    assert all(how == "computed" for _, how, _ in study3.cache.events)


def test_organism_study_on_a_training_run_folder(tmp_path):
    """`--model organism:RUN_DIR`: the run's stage3 is the model, its other stage folders are the
    stability checkpoints; a folder that is not a run is refused with the fix."""
    import shutil

    from mars_core.errors import ArtifactError, InputError
    from mars_core.organism.load import WEIGHTS, weights_dir

    run = tmp_path / "run"
    shutil.copytree(weights_dir("natural"), run / "stage3")
    shutil.copytree(WEIGHTS / "checkpoints" / "stage1", run / "stage1")
    study = rp.model_study(f"organism:{run}", tmp_path / "out", settings=QUICK, log=lambda m: None)
    shipped = rp.model_study("organism", tmp_path / "out2", settings=QUICK, log=lambda m: None)
    mm = study.sources["mm"]
    assert mm.model_id == "mars-organism/run:run"
    assert set(study.sources["checkpoints"]) == {"stage1", "stage3"} and "variant_offset" not in study.sources
    assert set(shipped.sources["checkpoints"]) == {"stage1", "stage2", "stage3", "stage4_extra"}
    assert "variant_offset" in shipped.sources
    # the run's stage3 is the shipped natural checkpoint: same weights, so the same checkpoint key
    assert study.sources["checkpoints"]["stage3"].fingerprint == shipped.sources["checkpoints"]["stage3"].fingerprint
    with pytest.raises(InputError, match="not an organism training run"):
        rp.model_study(f"organism:{run / 'stage1'}", tmp_path / "o", settings=QUICK, log=lambda m: None)
    with pytest.raises(ArtifactError, match="no shipped organism variant 'nope'"):
        rp.model_study("organism:nope", tmp_path / "o", settings=QUICK, log=lambda m: None)


def test_settings_are_immutable():
    s = rp.Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mars_tau = 0.3
    assert dataclasses.replace(s, mars_tau=0.3).mars_gate == {"tau": 0.3, "gain": None, "margin": None}
    assert s.mars_gate == {"tau": None, "gain": None, "margin": None}


def test_gate_is_refitted_with_its_full_grids_when_the_layer_moves(monkeypatch):
    """One layer/gate alternation (`fit_mars`): the second fit (after the layer moved) searches the
    same free parts as the first, not just the values the first fit chose."""
    import torch
    import xarray as xr

    import mars_core.steering.fit as fit_mod
    from mars_core.prompts import PromptSet
    from mars_core.steering.gate import DEFAULT_GAINS, DEFAULT_TAUS

    calls, layers, layer_gates = [], iter([1, 2]), []

    def fake_layer(mm, calib, harmful, *, mars_kwargs, **kw):
        layer_gates.append(dict(mars_kwargs))
        return next(layers), xr.Dataset(attrs={"selected_layer": 0, "fallback": ""})

    def fake_gate(mm, calib, layer, safe, *, taus, gains, margins, **kw):
        calls.append((layer, list(taus), list(gains), list(margins)))
        g = {"tau": taus[min(layer, len(taus) - 1)], "gain": gains[-1], "margin": margins[0]}
        return g, xr.Dataset(attrs={f"selected_{k}": v for k, v in g.items()})

    class Calib:  # what MARS(...) reads from a calibration, at any layer
        layers, n_layers, layers_path = (0, 1, 2), 3, None

        def index(self, layer):
            return int(layer)

        def at(self, layer):
            return {"r": torch.ones(4) / 2, "p_harm": 1.0, "p_safe": 0.0, "offsets": {}}

    monkeypatch.setattr(fit_mod, "select_mars_layer", fake_layer)
    monkeypatch.setattr(fit_mod, "select_mars_gate", fake_gate)
    safe = {"harmless_text_train": PromptSet("harmless_text_train", ["a", "b"], harmful=False)}
    op = fit_mod.fit_mars(None, Calib(), ["how do I make a bomb?"], safe)
    assert op.layer == 2 and [c[0] for c in calls] == [1, 2]
    assert calls[0][1:] == calls[1][1:] and calls[1][1] == list(DEFAULT_TAUS) and calls[1][2] == list(DEFAULT_GAINS)
    assert op.gate == {"tau": 0.1, "gain": 16.0, "margin": 0.0}  # the second fit's gate
    assert layer_gates[0] == fit_mod.INITIAL_GATE and layer_gates[1] == {"tau": 0.05, "gain": 16.0, "margin": 0.0}
    assert op.fit_info["layer_with_initial_gate"] == 1 and op.selection.attrs["tau_fitted_on_safe_data"] == 0.1
    # a part the caller fixes stays fixed in both fits; the others are searched both times
    calls.clear()
    layers = iter([1, 2])
    op = fit_mod.fit_mars(None, Calib(), ["how do I make a bomb?"], safe, gate={"tau": 0.3})
    assert [c[1] for c in calls] == [[0.3], [0.3]] and calls[1][2] == list(DEFAULT_GAINS)
    assert op.tau == 0.3 and op.fit_info["gate_fixed"] == {"tau": 0.3}


# ---------------------------------------------------------------------------- steps keyed by their reads
GRAPH = STEPS + variant_steps("offset")


@pytest.fixture(scope="module")
def organism_sources(tmp_path_factory):
    return rp.organism_study(tmp_path_factory.mktemp("src"), settings=QUICK, log=lambda m: None).sources


def test_no_fitted_choice_reads_harmful_multimodal_data(organism_sources):
    """MARS's layer and gate (and AutoSteer) are fitted from text and safe data only: the fitting
    steps read no harmful image or video set (the retired harness picked its layer by AUC on
    harmful images)."""
    by_name = {s.name: s for s in GRAPH}
    for name in ("mars", "autosteer", "calibration", "directions"):
        for r in by_name[name].reads:
            v = organism_sources.get(r)
            sets = v.values() if isinstance(v, dict) else [v]
            for ps in sets:
                if getattr(ps, "modality", "text") != "text":
                    assert ps.harmful is not True, (name, r, ps.name)
    assert all(ps.harmful is False for ps in organism_sources["gate_safe"].values())
    assert all(ps.harmful is None for ps in organism_sources["neutral_media"].values())
    assert organism_sources["harmful_text_train"].modality == "text"


def test_every_step_reads_only_its_parameters_and_known_values(organism_sources):
    """A step's inputs are its function's parameters (nothing else reaches it), and every value it
    reads is a source the study builds or an earlier step."""
    check_graph(GRAPH, organism_sources)
    for s in GRAPH:
        assert s.params and len(set(s.reads)) == len(s.reads), s.name
    read = {r for s in GRAPH for r in s.reads}
    assert read - {s.name for s in GRAPH} <= set(organism_sources)


class _Fake:
    """A step output whose content is the fingerprint of what the step read."""

    def __init__(self, fp):
        self.fingerprint = fp


def _fake_steps(calls):
    def make(step):
        @functools.wraps(step.fn)
        def fn(**kw):
            from mars_core.provenance import fingerprint

            calls.append(step.name)
            return _Fake(fingerprint(kw))

        return dataclasses.replace(step, fn=fn, write=lambda v, p: p.write_text(v.fingerprint),
                                   read=lambda p, reads: _Fake(p.read_text()))
    return [make(s) for s in GRAPH]


class _Changed:
    def __init__(self, name):
        self.fingerprint = f"changed {name}"


SOURCE_NAMES = sorted({r for s in GRAPH for r in s.reads} - {s.name for s in GRAPH})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changed=st.sets(st.sampled_from(SOURCE_NAMES), min_size=1, max_size=4))
def test_changing_inputs_reruns_exactly_the_dependent_steps(changed, organism_sources, tmp_path_factory):
    """Change any inputs (model weights, a prompt set, a setting, ...): exactly the steps that read
    them, directly or through other steps, run again; all others are reused from the cache."""
    root = tmp_path_factory.mktemp("cache")
    calls: list[str] = []
    steps = _fake_steps(calls)
    run_steps(steps, organism_sources, StepCache(root))
    assert sorted(calls) == sorted(s.name for s in GRAPH)
    calls.clear()
    new = {**organism_sources, **{n: _Changed(n) for n in changed}}
    run_steps(steps, new, StepCache(root))
    assert set(calls) == dependents(GRAPH, changed)
    assert set(calls) == {s.name for s in GRAPH if set(s.reads) & (set(changed) | set(calls))}


def test_swapping_the_direction_sets_recomputes_the_calibration(tmp_path):
    """The bug this graph fixes: calibration (and everything after it) read the directions but were
    keyed without them, so `mars evaluate --harmful/--harmless` reused a calibration of the old
    direction in the same output folder."""
    study = rp.organism_study(tmp_path, settings=QUICK, log=lambda m: None)
    run_steps(study.steps, study.sources, study.cache, targets=["calibration"])
    src = dict(study.sources)
    src["harmful_text_train"] = src["harmful_text_train"].subset(range(0, len(src["harmful_text_train"]), 2))
    cache = StepCache(tmp_path / ".mars_cache")
    v = run_steps(study.steps, src, cache, targets=["calibration"])
    assert [(n, how) for n, how, _ in cache.events] == [("directions", "computed"), ("calibration", "computed")]
    assert v["calibration"].fingerprint != run_steps(study.steps, study.sources, StepCache(tmp_path / ".mars_cache"),
                                                     targets=["calibration"])["calibration"].fingerprint
    # and an unchanged rerun reuses both
    again = StepCache(tmp_path / ".mars_cache")
    run_steps(study.steps, src, again, targets=["calibration"])
    assert [how for _, how, _ in again.events] == ["reused", "reused"]


def test_editing_a_step_function_changes_its_key():
    from analysis.graph import step_key

    def one(x):
        return x + 1

    def other(x):
        return x + 2

    a, b = Step("s", one, None, None, "json"), Step("s", other, None, None, "json")
    assert step_key(a, {"x": 1}) != step_key(b, {"x": 1})
    assert step_key(a, {"x": 1}) == step_key(a, {"x": 1}) != step_key(a, {"x": 2})
