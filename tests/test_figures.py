"""analysis.plotting: every figure runs on the synthetic Datasets, saves PDF+PNG, is labeled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from analysis import plotting as P
from analysis import synthetic


@pytest.fixture(scope="module")
def data():
    return synthetic.all_datasets()


def _saved(out, name):
    pdf, png = out / f"{name}.pdf", out / f"{name}.png"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def _legend_texts(fig: Figure) -> list[str]:
    legends = list(fig.legends) + [a.get_legend() for a in fig.axes if a.get_legend()]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def _plot_axes(fig: Figure) -> list[Axes]:
    """The data panels (colour bars excluded)."""
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def test_alignment(data, tmp_path):
    fig = P.plot_alignment(data["alignment"], out_dir=tmp_path)
    _saved(tmp_path, "alignment")
    axes = _plot_axes(fig)
    assert len(axes) == 3
    assert all(a.get_xlabel() == P.LAYER_LABEL for a in axes)
    assert "cos(" in axes[0].get_ylabel() and "‖offset‖" in axes[2].get_ylabel()
    assert all(a.get_title() for a in axes)
    assert set(_legend_texts(fig)) == {"Image", "Video"}
    assert len(axes[0].get_lines()) == 2 + 1  # one line per modality, plus the zero line


@pytest.mark.parametrize("variable,label", [("score", "log-odds"), ("refused", "(%)")])
def test_refusal_heatmap(data, tmp_path, variable, label):
    fig = P.plot_refusal_heatmap(data["curves"], method="actadd", prompt_set="harmful",
                                 variable=variable, out_dir=tmp_path, name="hm")
    _saved(tmp_path, "hm")
    axes = _plot_axes(fig)
    assert [a.get_title() for a in axes] == ["(a) Text input", "(b) Image input",
                                             "(c) Video input"]
    assert all(a.get_xlabel() == P.STRENGTH_LABEL for a in axes)
    assert axes[0].get_ylabel() == P.LAYER_LABEL
    cbar = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(cbar) == 1 and label in cbar[0].get_ylabel()
    assert "ActAdd" in fig.get_suptitle() and "harmful" in fig.get_suptitle()
    image = axes[0].get_images()[0].get_array()
    assert image.shape == (data["curves"].sizes["layer"], data["curves"].sizes["strength"])


def test_refusal_heatmap_rejects_unknown_method(data):
    with pytest.raises(ValueError, match="method='nope' is not in this Dataset"):
        P.plot_refusal_heatmap(data["curves"], method="nope")


def test_spurious(data, tmp_path):
    fig = P.plot_spurious(data["spurious"], out_dir=tmp_path)
    _saved(tmp_path, "spurious")
    a, b, c = _plot_axes(fig)
    assert a.get_xlabel() == "MARS gain\n(× text gap per unit of s above τ)"  # the dataset's own label
    assert a.get_ylabel() == P.RATE_LABEL and "MARS" in a.get_title()
    assert "projection" in b.get_ylabel() and "gate open (%)" in c.get_ylabel()
    assert [t.get_text() for t in b.get_xticklabels()] == ["Image", "Video"]
    assert _legend_texts(fig) == ["MARS without re-centering", "MARS with re-centering", "Image", "Video"]
    assert "synthetic" in fig.legends[0].get_title().get_text()  # the figure names the model
    assert len(a.collections) == 4  # a CI band per (re-centering, modality)
    assert len(c.patches) == 4  # a bar per (re-centering, modality)


def test_stability(data, tmp_path):
    fig = P.plot_stability(data["stability"], out_dir=tmp_path)
    _saved(tmp_path, "stability")
    a, b, c = _plot_axes(fig)
    assert "mean over layers" in a.get_title()
    assert b.get_xlabel() == "Steered checkpoint" and b.get_ylabel() == "Direction taken from"
    assert c.get_ylabel() == "Principal angle (degrees)"
    n = data["stability"].sizes["checkpoint"]
    assert len(a.texts) == n * n  # every cell annotated
    assert [t.get_text() for t in a.get_yticklabels()] == list(synthetic.CHECKPOINTS)
    labels = [x.get_ylabel() for x in fig.axes if x.get_label() == "<colorbar>"]
    assert labels == ["Cosine", "Refusal rate, harmful image (%)"]
    fig = P.plot_stability(data["stability"], layer=3)
    assert "layer 3" in fig.axes[0].get_title()


def test_comparison(data, tmp_path):
    ds = data["comparison"]
    fig = P.plot_comparison(ds, out_dir=tmp_path)
    _saved(tmp_path, "comparison")
    a, b = _plot_axes(fig)
    assert a.get_ylabel() == P.RATE_LABEL and b.get_ylabel() == "Utility (%)"
    assert _legend_texts(fig) == [P.method_style(m)["label"] for m in synthetic.METHODS_COMPARISON]
    assert [t.get_text() for t in a.get_xticklabels()][0] == P.METRICS["harmful_text"]
    n_methods = ds.sizes["method"]
    assert len(a.patches) == n_methods * 6 - 1  # the unmeasured cell has no bar ...
    assert any(t.get_text() == "n/a" for t in a.texts)  # ... but an n/a mark
    mars = [p for p in a.patches if np.allclose(p.get_facecolor()[:3], _rgb(P.METHODS["mars"]))]
    assert len(mars) == 6


def _rgb(style):
    from matplotlib.colors import to_rgb

    return to_rgb(style["color"])


@pytest.mark.parametrize("variable", ["refused", "score"])
def test_refusal_curves(data, tmp_path, variable):
    fig = P.plot_refusal_curves(data["curves"], variable=variable, out_dir=tmp_path,
                                name="curves")
    _saved(tmp_path, "curves")
    axes = _plot_axes(fig)
    assert len(axes) == 6
    assert axes[0].get_title() == "(a) Harmful text"
    assert axes[-1].get_xlabel() == "Steering strength\n(x text mean-difference norm)"  # from the dataset
    assert axes[0].get_ylabel() == (P.RATE_LABEL if variable == "refused" else P.SCORE_LABEL)
    assert _legend_texts(fig) == [P.method_style(m)["label"] for m in synthetic.METHODS_CURVES]
    assert len(axes[0].collections) == len(synthetic.METHODS_CURVES)  # CI bands
    assert "layer 4" in fig.legends[0].get_title().get_text()


def test_method_colours_consistent_across_figures(data):
    curves = P.plot_refusal_curves(data["curves"])
    comp = P.plot_comparison(data["comparison"])
    line = {l.get_label(): l.get_color() for l in curves.axes[0].get_lines()}
    bars = {h.get_label(): h.patches[0].get_facecolor()[:3] for h in comp.axes[0].containers
            if isinstance(h, BarContainer)}
    for m in set(synthetic.METHODS_CURVES) & set(synthetic.METHODS_COMPARISON):
        label = P.METHODS[m]["label"]
        assert np.allclose(_rgb({"color": line[label]}), bars[label])


def test_figure_into_given_axes(data):
    fig = Figure()
    ax = fig.add_subplot()
    out = P.plot_alignment(data["alignment"], variables=("auc",), ax=ax)
    assert out is fig and ax.get_ylabel() == "AUC along text direction"
    with pytest.raises(ValueError, match="draws 3 panel"):
        P.plot_alignment(data["alignment"], ax=ax)


def test_missing_variable_is_a_clear_error(data):
    with pytest.raises(ValueError, match="needs a Dataset with cosine"):
        P.plot_stability(data["alignment"])


def test_figure_set_writes_every_figure_named_after_its_dataset(data, tmp_path):
    from analysis.figure_set import write_all

    named = {"alignment": data["alignment"], "refusal_curves": data["curves"], "spurious_refusal": data["spurious"],
             "stability": data["stability"], "comparison": data["comparison"],
             "spurious_offset_variant": data["spurious"], "comparison_offset_variant": data["comparison"]}
    paths = write_all(named, tmp_path)
    assert paths and all(p.is_file() for p in paths.values())
    assert {p.stem for p in paths.values()} == {
        "alignment", "refusal_heatmap_actadd_harmful", "refusal_heatmap_actadd_harmless", "refusal_curves",
        "spurious", "stability", "comparison", "spurious_offset_variant", "comparison_offset_variant"}
    # a variant's comparison never overwrites the main one (it once did: `mars figures` wrote it last)
    assert paths["figure:comparison.png"] != paths["figure:comparison_offset_variant.png"]
    assert (tmp_path / "comparison.md").is_file() and (tmp_path / "comparison_offset_variant.md").is_file()


def test_wilson_interval():
    from mars_core.stats import wilson_interval

    p, lo, hi = wilson_interval([0, 5, 10], [10, 10, 10])
    assert np.allclose(p, [0, 0.5, 1]) and lo[0] == pytest.approx(0, abs=1e-12)
    assert hi[0] == pytest.approx(0.2775, abs=1e-3) and lo[1] == pytest.approx(0.2366, abs=1e-3)
    assert np.isnan(wilson_interval(0, 0)[0])


def test_failed_save_leaves_no_file(data, tmp_path, monkeypatch):
    fig = P.plot_comparison(data["comparison"])

    def half(self, path, **kwargs):
        Path(path).write_bytes(b"%PDF-1.4 half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(RuntimeError, match="disk full"):
        P.save_figure(fig, tmp_path, "comparison")
    assert list(tmp_path.iterdir()) == []


def test_zero_bars_overlapping_curves_and_flat_lines_stay_visible(data):
    """A zero-height bar still draws a cap line; methods with equal curves are dodged apart; a
    principal-angle line at 0 degrees sits above the axis, not on it."""
    from matplotlib.collections import LineCollection

    ds = data["comparison"].copy(deep=True)
    ds["value"].loc[{"method": "mars", "metric": "harmless_text"}] = 0.0
    fig = P.plot_comparison(ds)
    caps = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    ys = np.concatenate([np.asarray(seg)[:, :, 1].ravel() for c in caps for seg in [c.get_segments()]])
    assert (ys == 0).any()  # the zero bar's cap
    assert fig.axes[0].get_ylim()[0] < 0
    cv = data["curves"].copy(deep=True)
    cv["refused"].loc[{"method": "mars"}] = cv["refused"].sel({"method": "actadd"}).values
    fig = P.plot_refusal_curves(cv)
    lines = {l.get_label(): l.get_xdata() for l in fig.axes[0].get_lines()}
    a, b = lines[P.METHODS["actadd"]["label"]], lines[P.METHODS["mars"]["label"]]
    assert not np.allclose(a, b)  # same values, drawn apart
    st = data["stability"].copy(deep=True)
    st["principal_angle"].loc[{"checkpoint": st["checkpoint"].values[0], "checkpoint_b": st["checkpoint"].values[1]}] = 0
    fig = P.plot_stability(st)
    assert _plot_axes(fig)[-1].get_ylim()[0] < 0
