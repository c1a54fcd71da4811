"""`mars reproduce` on the shipped organism: artifacts, and resuming after an interruption."""

import json

import pytest

import analysis.reproduce as rp
from mars_core.datasets import load_dataset


@pytest.mark.slow
def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    st = rp.Settings.quick()
    st.curve_layers = (1, 2)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed midway")

    real_comparison = rp.step_comparison
    monkeypatch.setattr(rp, "step_comparison", boom)
    ctx = rp.organism_context(tmp_path, fresh=False, settings=st, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        rp.run(ctx)
    first = [(name, how) for name, how, _ in ctx.cache.events]
    assert first and all(how == "computed" for _, how in first)
    assert "comparison" not in {n for n, _ in first}

    monkeypatch.setattr(rp, "step_comparison", real_comparison)
    ctx2 = rp.organism_context(tmp_path, fresh=False, settings=st, log=lambda m: None)
    written = rp.run(ctx2)
    second = {name: how for name, how, _ in ctx2.cache.events}
    assert all(second[n] == "reused" for n, _ in first)  # nothing finished is recomputed
    assert second["comparison"] == "computed"
    assert second["spurious_offset"] == second["comparison_offset"] == "computed"

    # every dataset and figure of the study, with the contract's dims and provenance
    for name, dims in {
        "alignment": {"layer", "modality"},
        "refusal_curves": {"method", "modality", "prompt_set", "layer", "strength", "prompt"},
        "spurious_refusal": {"recenter", "strength", "modality", "prompt"},
        "stability": {"checkpoint", "checkpoint_b", "layer", "k"},
        "comparison": {"method", "metric", "bound"},
    }.items():
        ds = load_dataset(written[name])
        assert dims <= set(ds.dims), name
        assert ds.attrs["mars_version"] and ds.attrs["created"]
    assert "mars_no_recenter" in load_dataset(written["comparison_offset_variant"])["method"].values
    for fig in ("alignment", "refusal_curves", "spurious", "stability", "comparison", "spurious_offset_variant"):
        assert f"figure:{fig}.png" in written and f"figure:{fig}.pdf" in written
    table = json.loads(written["comparison.json"].read_text())
    assert table  # the JSON table is non-empty
    assert "| mars |" in written["comparison.md"].read_text()
    # the organism card's per-seed table of the package's MARS reads these files
    from mars_core.organism.ship import package_mars_table

    card = package_mars_table([tmp_path], ["run"]).splitlines()
    sel, cmp = load_dataset(written["mars_layer_selection"]), load_dataset(written["comparison"])
    assert card[2] == f"| MARS layer (`select_mars_layer`) | {int(sel.attrs['selected_layer'])} |"
    mars_hi = cmp["value"].sel({"method": "mars", "metric": "harmless_image"}).values
    assert f"| MARS: harmless-image refusal | {mars_hi[0]:.2f} [{mars_hi[1]:.2f}, {mars_hi[2]:.2f}] |" in card

    # --fresh recomputes everything
    ctx3 = rp.organism_context(tmp_path, fresh=True, settings=st, log=lambda m: None)
    rp.run(ctx3, figures=False)
    assert all(how == "computed" for _, how, _ in ctx3.cache.events)


def test_organism_context_on_a_training_run_folder(tmp_path):
    """`mars reproduce --model organism:RUN_DIR`: the run's stage3 is the model, its other stage
    folders are the stability checkpoints; a folder that is not a run is refused with the fix."""
    import shutil

    from mars_core.errors import InputError
    from mars_core.organism.load import WEIGHTS, weights_dir

    run = tmp_path / "run"
    shutil.copytree(weights_dir("natural"), run / "stage3")
    shutil.copytree(WEIGHTS / "checkpoints" / "stage1", run / "stage1")
    st = rp.Settings.quick()
    ctx = rp.organism_context(tmp_path / "out", fresh=False, settings=st, log=lambda m: None, run_dir=run)
    shipped = rp.organism_context(tmp_path / "out2", fresh=False, settings=st, log=lambda m: None)
    assert ctx.model_key.split(":")[-1] == shipped.model_key.split(":")[-1]  # same weights hash
    assert ctx.mm.model_id == "mars-organism/run:run"
    assert set(ctx.checkpoints) == {"stage1", "stage3"} and not ctx.variants
    assert set(shipped.checkpoints) == {"stage1", "stage2", "stage3", "stage4_extra"} and "offset" in shipped.variants
    with pytest.raises(InputError, match="not an organism training run"):
        rp.organism_context(tmp_path / "out", fresh=False, settings=st, log=lambda m: None, run_dir=tmp_path / "out")
    # `--model organism:X` (mars reproduce / analyze / evaluate) resolves X the same way everywhere:
    # a run folder, else a named variant
    from mars_core.errors import ArtifactError
    from mars_core.evaluate import model_context

    via_cli = model_context(f"organism:{run}", tmp_path / "out3", fresh=False, settings=st, log=lambda m: None)
    assert via_cli.model_key == ctx.model_key and set(via_cli.checkpoints) == {"stage1", "stage3"}
    with pytest.raises(ArtifactError, match="no shipped organism variant 'nope'"):
        model_context("organism:nope", tmp_path / "out4", fresh=False, settings=st, log=lambda m: None)


def test_gate_is_refitted_with_its_full_grids_when_the_layer_moves(monkeypatch):
    """One layer/gate alternation (`fit_mars`): the second fit (after the layer moved) searches the
    same free parts as the first, not just the values the first fit chose."""
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
            import torch

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
