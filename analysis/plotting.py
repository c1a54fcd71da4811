"""Publication figures: one function per figure, each taking only an analysis Dataset.

Shared style: Okabe-Ito colours (colour-blind safe), DejaVu/Arial sans fonts sized for a
single (3.4 in) or double (7 in) column, TrueType fonts in the PDF, and one mapping of method
names to display names, colours, line styles and hatches (`METHODS`), so a method looks the
same in every figure. Every function returns a `matplotlib.figure.Figure` (no pyplot state)
and, given `out_dir`, writes `<out_dir>/<name>.pdf` and `.png` via `save_figure`.
The Dataset layouts are those of docs/datasets.md (see `analysis.synthetic`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import matplotlib as mpl
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mars_core.provenance import atomic_path
from mars_core.stats import bootstrap_mean_ci, wilson_interval

SINGLE, DOUBLE = 3.4, 7.0  # column widths in inches
PNG_DPI = 200
OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "skyblue": "#56B4E9", "green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7",
    "grey": "#999999",
}
_C = OKABE_ITO
STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["Arial", "Helvetica", "DejaVu Sans"],
    "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7.5,
    "figure.titlesize": 9, "axes.linewidth": 0.7, "lines.linewidth": 1.4,
    "lines.markersize": 3.5, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#E5E5E5", "grid.linewidth": 0.5, "axes.axisbelow": True,
    "legend.frameon": False, "pdf.fonttype": 42, "ps.fonttype": 42, "savefig.dpi": PNG_DPI,
    "figure.dpi": 100, "image.cmap": "viridis",
    "axes.prop_cycle": mpl.cycler(color=[_C[k] for k in (
        "blue", "orange", "green", "vermillion", "purple", "skyblue", "black", "yellow")]),
}

# One entry per method short name (docs/datasets.md): display name and how it is drawn.
METHODS: dict[str, dict] = {
    "none": dict(label="No steering", color=_C["grey"], ls=":", marker="o", hatch=""),
    "actadd": dict(label="ActAdd", color=_C["orange"], ls="-", marker="s", hatch=""),
    "actadd_all_tokens": dict(label="ActAdd (all tokens)", color=_C["orange"], ls="--",
                              marker="s", hatch="///"),
    "ablation": dict(label="Dir. ablation", color=_C["purple"], ls="-", marker="v", hatch=""),
    "autosteer": dict(label="AutoSteer", color=_C["skyblue"], ls="-", marker="D", hatch=""),
    "mars": dict(label="MARS", color=_C["blue"], ls="-", marker="o", hatch=""),
    "mars_no_recenter": dict(label="MARS w/o re-centering", color=_C["vermillion"], ls="-",
                             marker="^", hatch=""),
    "mars_fixed_strength": dict(label="MARS fixed strength", color=_C["green"], ls="-",
                                marker="P", hatch=""),
    "mars_given_layer": dict(label="MARS given layer", color=_C["black"], ls="-.",
                             marker="X", hatch=""),
    "mars_all_tokens": dict(label="MARS (all tokens)", color=_C["blue"], ls="--", marker="o",
                            hatch="///"),
}
MODALITIES = {
    "text": dict(label="Text", color=_C["black"], ls="-", marker="o"),
    "image": dict(label="Image", color=_C["orange"], ls="-", marker="o"),
    "video": dict(label="Video", color=_C["skyblue"], ls="--", marker="s"),
}
RECENTER = {  # colours match "mars" (re-centred) and "mars_no_recenter"
    False: dict(label="without re-centering", color=_C["vermillion"]),
    True: dict(label="with re-centering", color=_C["blue"]),
}
METRICS = {
    "harmful_text": "Harmful\ntext ↑", "harmful_image": "Harmful\nimage ↑",
    "harmful_video": "Harmful\nvideo ↑", "harmless_text": "Harmless\ntext ↓",
    "harmless_image": "Harmless\nimage ↓", "harmless_video": "Harmless\nvideo ↓",
    "caption_accuracy": "Caption\naccuracy ↑",
}
STRENGTH_LABEL = "Steering strength\n(× text mean-diff. norm)"
LAYER_LABEL = "Decoder layer (index)"
RATE_LABEL = "Refusal rate (%)"
SCORE_LABEL = "Refusal score (log-odds)"
_FALLBACK = [_C[k] for k in ("green", "purple", "skyblue", "yellow", "black")]


def method_style(name: str) -> dict:
    """Display name, colour, line style, marker and hatch of a method (unknown: a fallback)."""
    if name in METHODS:
        return METHODS[name]
    i = sum(map(ord, str(name))) % len(_FALLBACK)
    return dict(label=str(name), color=_FALLBACK[i], ls="--", marker="o", hatch="..")


def _modality(name: str) -> dict:
    return MODALITIES.get(name, dict(label=str(name).capitalize(), color=_C["green"], ls="-.",
                                     marker="D"))


# --- statistics ---------------------------------------------------------------------------

def rate_ci(da: xr.DataArray, dim: str = "prompt"):
    """Refusal rate over `dim` of 0/1 values (NaN ignored) with a 95% Wilson interval
    (`mars_core.stats.wilson_interval`)."""
    k = da.sum(dim, skipna=True).values
    n = da.notnull().sum(dim).values
    return wilson_interval(np.rint(k), n)


def mean_ci(da: xr.DataArray, dim: str = "prompt", n_boot: int = 1000, seed: int = 0):
    """Mean over `dim` (NaN ignored) with a 95% percentile-bootstrap interval
    (`mars_core.stats.bootstrap_mean_ci`), element-wise over the other dims."""
    v = np.moveaxis(da.values, da.get_axis_num(dim), -1)
    out = np.full((3,) + v.shape[:-1], np.nan)
    for idx in np.ndindex(v.shape[:-1]):
        out[(slice(None),) + idx] = bootstrap_mean_ci(v[idx], n_boot=n_boot, seed=seed)
    return out[0], out[1], out[2]


# --- figure plumbing ----------------------------------------------------------------------

def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `fig` as vector PDF and PNG (200 dpi) into `out_dir`, atomically; returns paths."""
    out = Path(out_dir)
    paths = (out / f"{name}.pdf", out / f"{name}.png")
    meta = {"pdf": {"CreationDate": None, "Creator": "mars-steering"}, "png": {"Software": None}}
    with mpl.rc_context(STYLE):
        for p in paths:
            fmt = p.suffix[1:]
            with atomic_path(p) as tmp:
                fig.savefig(tmp, format=fmt, dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.03,
                            metadata=meta[fmt], facecolor="white")
    return paths


def _styled(fn):
    """Run a figure function under the shared style."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _axes(ax, n: int, figsize, **gridspec) -> tuple[Figure, list[Axes]]:
    """`n` axes: the given ones (an Axes or a sequence of them) or a new constrained figure."""
    if ax is not None:
        axes = [ax] if isinstance(ax, Axes) else list(np.ravel(ax))
        if len(axes) != n:
            raise ValueError(f"this figure draws {n} panel(s); got {len(axes)} axes")
        return axes[0].figure, axes
    fig = Figure(figsize=figsize, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.03, h_pad=0.03, wspace=0.04, hspace=0.04)
    return fig, list(np.ravel(fig.subplots(1, n, gridspec_kw=gridspec or None, squeeze=False)))


def _finish(fig: Figure, out_dir, name: str) -> Figure:
    if out_dir is not None:
        save_figure(fig, out_dir, name)
    return fig


def _require(ds: xr.Dataset, figure: str, variables: Sequence[str], dims: Sequence[str]):
    missing = [v for v in variables if v not in ds.data_vars]
    missing += [f"dim {d}" for d in dims if d not in ds.dims]
    if missing:
        raise ValueError(f"{figure} needs a Dataset with {', '.join(missing)} "
                         f"(see docs/datasets.md); got variables {list(ds.data_vars)}, "
                         f"dims {list(ds.dims)}")


def _pick(ds: xr.Dataset, dim: str, value):
    values = [v.item() for v in ds[dim]]
    if value not in values:
        raise ValueError(f"{dim}={value!r} is not in this Dataset; choose one of {values}")
    return ds.sel({dim: value})


def _int_ticks(ax: Axes, axis: str = "x") -> None:
    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True, nbins=6))


def _model_name(ds: xr.Dataset) -> str:
    """The model (and variant) a Dataset was measured on, for figure titles."""
    mid = ds.attrs.get("model_id", "")
    if isinstance(mid, (list, tuple)):  # checkpoints of one model: "id@stage1", "id@stage2", ...
        bases = list(dict.fromkeys(str(m).split("@")[0] for m in mid))
        mid = ", ".join(bases)
    variant = ds.attrs.get("model_variant", "")
    return f"the `{variant}` variant ({mid})" if variant else str(mid)


def _coord_label(da: xr.DataArray, fallback: str) -> str:
    """'long name (units)' of a coordinate, from the Dataset (fallback if it has none)."""
    ln, u = da.attrs.get("long_name"), da.attrs.get("units")
    if not ln:
        return fallback
    return f"{ln[:1].upper()}{ln[1:]}" + (f"\n({u})" if u else "")


def _bars(a: Axes, x, heights, *, width, color, hatch: str = "", **kw):
    """Bars whose zero heights stay visible (a short cap line at every bar's top); hatched bars get
    white hatch lines so two methods of one colour stay apart."""
    out = a.bar(x, heights, width=width, color=color, edgecolor="white" if hatch else color, hatch=hatch or None,
                linewidth=0.4 if hatch else 0.6, **kw)
    a.hlines(heights, np.asarray(x) - width / 2, np.asarray(x) + width / 2, colors=color, lw=1.2, zorder=3)
    return out


def _top_legend(fig: Figure, handles, ncol: int | None = None, title: str | None = None):
    fig.legend(handles=handles, loc="outside upper center", ncol=ncol or len(handles),
               frameon=False, handlelength=2.2, columnspacing=1.2, title=title)


# --- figures ------------------------------------------------------------------------------

ALIGNMENT_PANELS = {  # variable: (title, y label, reference line)
    "cos_direction": ("Refusal-direction alignment", "cos(text dir., modality dir.)", 0.0),
    "cos_offset": ("Modality offset vs. refusal direction", "cos(modality offset, text dir.)",
                   0.0),
    "offset_norm_ratio": ("Size of the modality offset", "‖offset‖ / ‖text mean diff.‖ (×)",
                          1.0),
    "offset_projection_ratio": ("Offset along the refusal direction",
                                "offset·r̂ / text harmful–harmless gap (×)", 0.0),
    "auc": ("Harmful vs. harmless separability", "AUC along text direction", 0.5),
}


@_styled
def plot_alignment(ds: xr.Dataset, variables=("cos_direction", "cos_offset",
                                              "offset_norm_ratio"),
                   out_dir=None, ax=None, name: str = "alignment") -> Figure:
    """Alignment of each modality with the text refusal direction, against layer."""
    _require(ds, "plot_alignment", variables, ["layer", "modality"])
    fig, axes = _axes(ax, len(variables), (SINGLE if len(variables) == 1 else DOUBLE, 2.3))
    for letter, a, var in zip("abcdefgh", axes, variables):
        da = ds[var]
        title, ylabel, ref = ALIGNMENT_PANELS.get(
            var, (da.attrs.get("long_name", var), f"{var} ({da.attrs.get('units', '')})", None))
        for m in ds["modality"].values:
            st = _modality(str(m))
            a.plot(ds["layer"], da.sel(modality=m), color=st["color"], ls=st["ls"],
                   marker=st["marker"], label=st["label"])
        if ref is not None:
            a.axhline(ref, color="#555555", lw=0.7, ls=":", zorder=1)
        prefix = f"({letter}) " if len(variables) > 1 else ""
        a.set(title=f"{prefix}{title}", xlabel=LAYER_LABEL, ylabel=ylabel)
        _int_ticks(a)
    axes[0].legend(title="Modality", loc="best")
    fig.suptitle(f"Text refusal direction vs. multimodal requests on {_model_name(ds)}")
    return _finish(fig, out_dir, name)


def _heat_ticks(a: Axes, values, axis: str, max_ticks: int = 9) -> None:
    step = max(1, int(np.ceil(len(values) / max_ticks)))
    pos = np.arange(len(values))[::step]
    labels = [f"{v:g}" for v in np.asarray(values)[::step]]
    (a.set_xticks if axis == "x" else a.set_yticks)(pos, labels)


@_styled
def plot_refusal_heatmap(ds: xr.Dataset, method: str = "actadd", prompt_set: str = "harmful",
                         variable: str = "score", out_dir=None, ax=None,
                         name: str | None = None) -> Figure:
    """Mean refusal score (or rate) over layer x strength, one panel per modality."""
    _require(ds, "plot_refusal_heatmap", [variable],
             ["method", "modality", "prompt_set", "layer", "strength", "prompt"])
    sub = _pick(_pick(ds, "method", method), "prompt_set", prompt_set)[variable]
    mods = [str(m) for m in sub["modality"].values]
    fig, axes = _axes(ax, len(mods), (DOUBLE, 2.5))
    if variable == "refused":
        grid = sub.mean("prompt", skipna=True) * 100
        kw, label = dict(cmap="viridis", vmin=0, vmax=100), RATE_LABEL
    else:
        grid = sub.mean("prompt", skipna=True)
        vmax = float(np.nanmax(np.abs(grid.values))) or 1.0
        kw, label = dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax), SCORE_LABEL
    for letter, a, m in zip("abcdefgh", axes, mods):
        g = grid.sel(modality=m).transpose("layer", "strength")
        im = a.imshow(g.values, origin="lower", aspect="auto", interpolation="nearest", **kw)
        _heat_ticks(a, g["strength"].values, "x")
        _heat_ticks(a, g["layer"].values, "y")
        a.grid(False)
        a.set(title=f"({letter}) {_modality(m)['label']} input", xlabel=STRENGTH_LABEL,
              ylabel=LAYER_LABEL if a is axes[0] else "")
    cb = fig.colorbar(im, ax=axes, shrink=0.9, pad=0.02)
    cb.set_label(label + ("\n(red = refuses, blue = complies)" if variable != "refused" else ""))
    fig.suptitle(f"{method_style(method)['label']} on {prompt_set} prompts "
                 f"(mean over {sub.sizes['prompt']} prompts)")
    return _finish(fig, out_dir, name or f"refusal_heatmap_{method}_{prompt_set}")


def _violins(a: Axes, data: list[np.ndarray], positions, color: str) -> None:
    data = [d[np.isfinite(d)] for d in data]
    keep = [i for i, d in enumerate(data) if d.size > 1]
    if not keep:
        return
    parts = a.violinplot([data[i] for i in keep], positions=[positions[i] for i in keep],
                         widths=0.36, showextrema=False, showmedians=False)
    for body in parts["bodies"]:
        body.set(facecolor=color, edgecolor=color, alpha=0.35, linewidth=0.8)
    for i in keep:
        q1, med, q3 = np.percentile(data[i], [25, 50, 75])
        a.vlines(positions[i], q1, q3, color=color, lw=2.2)
        a.plot(positions[i], med, "o", ms=3, mfc="white", mec=color, mew=1)


@_styled
def plot_spurious(ds: xr.Dataset, out_dir=None, ax=None, name: str = "spurious") -> Figure:
    """Spurious refusal of safe multimodal inputs under MARS, with and without re-centering.

    (a) refusal rate vs MARS gain with 95% Wilson CIs over prompts; (b) distribution of the
    normalised projection s (seaborn violins); (c) share of safe inputs the adaptive gate opens for.
    """
    import pandas as pd
    import seaborn as sns

    _require(ds, "plot_spurious", ["refused", "projection", "gate_open"],
             ["recenter", "strength", "modality", "prompt"])
    fig, (a, b, c) = _axes(ax, 3, (DOUBLE, 2.8), width_ratios=[1.5, 1.1, 0.8])
    mods = [str(m) for m in ds["modality"].values]
    flags = [bool(r) for r in ds["recenter"].values]
    x = ds["strength"].values
    for r in flags:
        col = RECENTER[r]["color"]
        for m in mods:
            p, lo, hi = rate_ci(ds["refused"].sel(recenter=r, modality=m))
            st = _modality(m)
            a.plot(x, p * 100, color=col, ls=st["ls"], marker=st["marker"], clip_on=False, zorder=3)
            a.fill_between(x, lo * 100, hi * 100, color=col, alpha=0.15, lw=0)
    a.set(title="(a) Refusal of safe inputs under MARS", xlabel=_coord_label(ds["strength"], STRENGTH_LABEL),
          ylabel=RATE_LABEL, ylim=(-3, 103))
    rows = [{"modality": _modality(m)["label"], "re-centering": RECENTER[r]["label"], "s": float(v)}
            for r in flags for m in mods for v in ds["projection"].sel(recenter=r, modality=m).values
            if np.isfinite(v)]
    palette = {RECENTER[r]["label"]: RECENTER[r]["color"] for r in flags}
    sns.violinplot(data=pd.DataFrame(rows), x="modality", y="s", hue="re-centering", palette=palette, ax=b,
                   inner="quartile", cut=0, linewidth=0.7, legend=False, density_norm="width")
    tau = ds.attrs.get("tau")
    refs = {0.0: "harmless text", 1.0: "harmful text"}
    if tau not in (None, ""):
        near = [y for y in refs if abs(y - float(tau)) < 0.08]
        if near:
            refs[near[0]] += f" (gate τ = {float(tau):g})"
        else:
            refs[float(tau)] = f"gate τ = {float(tau):g}"
    for y, txt in refs.items():
        b.axhline(y, color="#555555", lw=0.7, ls="--" if "gate" in txt and y not in (0.0, 1.0) else ":", zorder=1)
        b.text(1.0, y, f" {txt}", transform=b.get_yaxis_transform(), va="center", ha="left",
               fontsize=6.5, color="#333333", clip_on=False)
    b.set(title="(b) Projection of safe inputs", xlabel="Safe input modality",
          ylabel="Normalised projection s\n(0/1 = harmless/harmful text)")
    b.grid(False, axis="x")
    pos = np.arange(len(mods))
    for j, r in enumerate(flags):
        off = (j - (len(flags) - 1) / 2) * 0.4
        p, lo, hi = rate_ci(ds["gate_open"].sel(recenter=r), "prompt")
        _bars(c, pos + off, p * 100, width=0.38, color=RECENTER[r]["color"], alpha=0.85,
              yerr=[(p - lo) * 100, (hi - p) * 100], capsize=2, error_kw=dict(lw=0.8, ecolor="#333333"))
        for xi, v, h in zip(pos + off, p * 100, hi * 100):
            c.text(xi, h + 1.5, f"{v:.0f}", ha="center", va="bottom", fontsize=6.5)
    labels = [_modality(m)["label"] for m in mods]
    c.set(title="(c) Gate open", xlabel="Safe input modality",
          ylabel="Safe inputs with gate open (%)", ylim=(-3, 110))
    c.set_xticks(pos, labels)
    c.grid(False, axis="x")
    handles = [Line2D([], [], color=RECENTER[r]["color"], lw=2, label=f"MARS {RECENTER[r]['label']}")
               for r in flags]
    handles += [Line2D([], [], color="#333333", ls=_modality(m)["ls"],
                       marker=_modality(m)["marker"], label=_modality(m)["label"]) for m in mods]
    _top_legend(fig, handles, title=f"MARS at layer {ds.attrs.get('layer', '?')} on {_model_name(ds)}")
    return _finish(fig, out_dir, name)


def _annotated_heatmap(a: Axes, values: np.ndarray, labels, fmt: str, **kw):
    im = a.imshow(values, interpolation="nearest", aspect="auto", **kw)
    cmap, norm = im.get_cmap(), im.norm
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            dark = np.mean(cmap(norm(v))[:3]) < 0.5
            a.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6.5,
                   color="white" if dark else "black")
    a.set_xticks(range(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor")
    a.set_yticks(range(len(labels)), labels)
    a.grid(False)
    a.spines[:].set_visible(False)
    return im


@_styled
def plot_stability(ds: xr.Dataset, layer: int | None = None, out_dir=None, ax=None,
                   name: str = "stability") -> Figure:
    """Refusal directions across checkpoints: cosine, transplant refusal, principal angles."""
    _require(ds, "plot_stability", ["cosine", "transplant_refusal"],
             ["checkpoint", "checkpoint_b", "layer"])
    has_angles = "principal_angle" in ds.data_vars and "k" in ds.dims
    fig, axes = _axes(ax, 3 if has_angles else 2, (DOUBLE, 2.7),
                      width_ratios=[1, 1, 0.9] if has_angles else None)
    names = [str(c) for c in ds["checkpoint"].values]
    if layer is None:
        cos, where = ds["cosine"].mean("layer"), "mean over layers"
    else:
        cos, where = _pick(ds, "layer", layer)["cosine"], f"layer {layer}"
    cos = cos.transpose("checkpoint", "checkpoint_b").values
    im = _annotated_heatmap(axes[0], cos, names, ".2f", cmap="viridis",
                            vmin=min(0.0, float(np.nanmin(cos))), vmax=1.0)
    fig.colorbar(im, ax=axes[0], shrink=0.8, pad=0.02).set_label("Cosine")
    axes[0].set(title=f"(a) Direction cosine\n({where})", xlabel="Checkpoint",
                ylabel="Checkpoint")
    tr = ds["transplant_refusal"].transpose("checkpoint", "checkpoint_b").values * 100
    im = _annotated_heatmap(axes[1], tr, names, ".0f", cmap="viridis", vmin=0, vmax=100)
    fig.colorbar(im, ax=axes[1], shrink=0.8, pad=0.02).set_label(
        "Refusal rate, harmful image (%)")
    axes[1].set(title="(b) Refusal with a direction\nfrom another checkpoint", xlabel="Steered checkpoint",
                ylabel="Direction taken from")
    if has_angles:
        a, ref = axes[2], names[0]
        colors = [_C[k] for k in ("orange", "skyblue", "green", "vermillion", "purple", "blue")]
        for i, other in enumerate(names[1:]):
            ang = ds["principal_angle"].sel(checkpoint=ref, checkpoint_b=other)
            a.plot(ds["k"], ang, marker="o", color=colors[i % len(colors)], label=other, clip_on=False,
                   zorder=3)
        top = float(np.nanmax(ds["principal_angle"].values)) if np.isfinite(ds["principal_angle"].values).any() else 1
        a.set(title=f"(c) Principal angles of top-k\nsubspaces to {ref}", xlabel="Subspace dimension k",
              ylabel="Principal angle (degrees)", ylim=(-0.04 * max(top, 1.0), 1.08 * max(top, 1.0)))
        _int_ticks(a)
        a.legend(title="Checkpoint", loc="best")
    fig.suptitle(f"Refusal direction across training checkpoints of {_model_name(ds)}")
    return _finish(fig, out_dir, name)


def _percent(da: xr.DataArray) -> bool:
    return da.attrs.get("units", "fraction") in ("fraction", "1", "", "rate")


@_styled
def plot_comparison(ds: xr.Dataset, methods: Sequence[str] | None = None,
                    out_dir=None, ax=None, name: str = "comparison") -> Figure:
    """Grouped bars: refusal rates (left) and utility (right) per method, 95% CI error bars."""
    _require(ds, "plot_comparison", ["value"], ["method", "metric", "bound"])
    val = ds["value"]
    methods = [str(m) for m in (methods or ds["method"].values)]
    metrics = [str(m) for m in ds["metric"].values
               if not np.all(np.isnan(val.sel({"metric": m, "method": methods}).values))]
    rates = [m for m in metrics if m.startswith(("harmful", "harmless"))]
    utility = [m for m in metrics if m not in rates]
    groups = [g for g in (rates, utility) if g]
    fig, axes = _axes(ax, len(groups), (DOUBLE if len(metrics) > 3 else SINGLE, 2.6),
                      width_ratios=[max(len(g), 1.3) for g in groups])
    scale = 100 if _percent(val) else 1
    width = 0.8 / len(methods)
    for a, group in zip(axes, groups):
        x = np.arange(len(group))
        for i, m in enumerate(methods):
            st = method_style(m)
            v = val.sel({"method": m, "metric": group})
            est, lo, hi = (v.sel(bound=b).values * scale for b in ("estimate", "low", "high"))
            xi = x + (i - (len(methods) - 1) / 2) * width
            ok = np.isfinite(est)
            _bars(a, xi[ok], est[ok], width=width * 0.92, color=st["color"], hatch=st["hatch"], label=st["label"],
                  yerr=[np.nan_to_num(est - lo)[ok], np.nan_to_num(hi - est)[ok]],
                  error_kw=dict(lw=0.7, capsize=1.5, ecolor="#333333"))
            for xn in xi[~ok]:
                a.text(xn, 1.5 * scale / 100, "n/a", rotation=90, ha="center", va="bottom",
                       fontsize=5.5, color="#555555")
        a.set_xticks(x, [METRICS.get(g, g) for g in group])
        a.grid(False, axis="x")
        a.set_ylim(-0.03 * scale, 1.05 * scale)
    unit = " (%)" if scale == 100 else f" ({val.attrs.get('units', '')})"
    pre = "(a) " if len(groups) == 2 else ""
    axes[0].set(ylabel=(RATE_LABEL if rates else "Utility" + unit),
                title=pre + ("Refusal rate (↑ harmful, ↓ harmless)" if rates else "Utility ↑"),
                xlabel="Prompt set and modality" if rates else "Metric")
    if len(groups) == 2:
        axes[1].set(ylabel="Utility" + unit, title="(b) Utility ↑", xlabel="Metric")
    gate = ds.attrs.get("mars_gate") or {}
    g = (", gate " + ", ".join(f"{k} {v:g}" for k, v in gate.items())) if isinstance(gate, dict) and gate else ""
    _top_legend(fig, axes[0].get_legend_handles_labels()[0], ncol=min(len(methods), 6),
                title=f"{_model_name(ds)}: MARS at layer {ds.attrs.get('layer', '?')}{g}; 95% bootstrap CIs")
    return _finish(fig, out_dir, name)


@_styled
def plot_refusal_curves(ds: xr.Dataset, layer: int | None = None, variable: str = "refused",
                        methods: Sequence[str] | None = None, out_dir=None, ax=None,
                        name: str = "refusal_curves") -> Figure:
    """Refusal rate (or score) vs strength per method with 95% CIs; modality x prompt set.

    `layer` defaults to `ds.attrs["layer"]` if present, else the middle layer.
    """
    _require(ds, "plot_refusal_curves", [variable],
             ["method", "modality", "prompt_set", "layer", "strength", "prompt"])
    if layer is None:
        layer = int(ds.attrs.get("layer", ds["layer"].values[len(ds["layer"]) // 2]))
    sub = _pick(ds, "layer", layer)[variable]
    methods = [str(m) for m in (methods or ds["method"].values)]
    mods, sets = [str(m) for m in ds["modality"].values], [str(p) for p in ds["prompt_set"].values]
    if ax is None:
        fig = Figure(figsize=(DOUBLE, 1.0 + 2.0 * len(sets)), layout="constrained")
        axes = fig.subplots(len(sets), len(mods), sharex=True, sharey=True, squeeze=False)
    else:
        fig, flat = _axes(ax, len(sets) * len(mods), None)
        axes = np.asarray(flat).reshape(len(sets), len(mods))
    x = ds["strength"].values
    log_x = bool((x > 0).all() and len(x) > 2 and np.allclose(np.diff(np.log(x)), np.diff(np.log(x))[0]))
    letters = iter("abcdefghijklmnop")
    for (r, ps), (c, mo) in ((rc, mc) for rc in enumerate(sets) for mc in enumerate(mods)):
        a = axes[r, c]
        for i, m in enumerate(methods):
            da = sub.sel({"method": m, "modality": mo, "prompt_set": ps})
            p, lo, hi = rate_ci(da) if variable == "refused" else mean_ci(da)
            if not np.any(np.isfinite(p)):
                continue
            k = 100 if variable == "refused" else 1
            st = method_style(m)
            # methods that agree would hide each other: dodge each along x and draw open markers
            shift = (i - (len(methods) - 1) / 2) * 0.035
            xs = x * np.exp(shift) if log_x else x + shift * (x.max() - x.min() if len(x) > 1 else 1)
            a.plot(xs, p * k, color=st["color"], ls=st["ls"], marker=st["marker"], mfc="white", mew=1.0,
                   label=st["label"], clip_on=False, zorder=3)
            a.fill_between(xs, lo * k, hi * k, color=st["color"], lw=0, alpha=min(0.12, 0.5 / len(methods)))
        if log_x:
            a.set_xscale("log")
            a.set_xticks(x, [f"{v:g}" for v in x])
            a.minorticks_off()
        a.set_title(f"({next(letters)}) {ps.capitalize()} {_modality(mo)['label'].lower()}")
        a.set(xlabel=_coord_label(ds["strength"], STRENGTH_LABEL) if r == len(sets) - 1 else "",
              ylabel=(RATE_LABEL if variable == "refused" else SCORE_LABEL) if c == 0 else "")
        if variable == "refused":
            a.set_ylim(-3, 103)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    _top_legend(fig, handles, ncol=min(len(handles), 5),
                title=f"{_model_name(ds)}: steering at layer {layer}; shaded: 95% "
                      f"{'Wilson' if variable == 'refused' else 'bootstrap'} CI over prompts; points dodged "
                      "sideways so equal curves stay visible; adaptive MARS sets its own strength (flat in x)")
    return _finish(fig, out_dir, name)


@_styled
def plot_mars_layer_selection(ds: xr.Dataset, out_dir=None, ax=None, name: str = "mars_layer_selection") -> Figure:
    """MARS's layer choice: (a) refusal MARS induces on harmful text per layer; (b) the spurious
    refusal it adds to object-less neutral inputs, with the bound; the chosen layer marked and a
    fallback named in the title."""
    _require(ds, "plot_mars_layer_selection", ["induced", "spurious_delta", "feasible"], ["layer", "modality"])
    fig, (a, b) = _axes(ax, 2, (DOUBLE, 2.4))
    layers = ds["layer"].values
    chosen = int(ds.attrs.get("selected_layer", layers[0]))
    feasible = ds["feasible"].values.astype(bool)
    for axis in (a, b):
        for l, ok in zip(layers, feasible):
            if not ok:
                axis.axvspan(l - 0.5, l + 0.5, color="#EEEEEE", lw=0, zorder=0)
        axis.axvline(chosen, color=METHODS["mars"]["color"], lw=1.0, ls="--", zorder=1)
        _int_ticks(axis)
    a.plot(layers, ds["induced"], color=METHODS["mars"]["color"], marker="o", label="MARS")
    a.axhline(float(ds["induced_base"]), color=METHODS["none"]["color"], ls=":", label="no steering")
    a.set(title="(a) Refusal induced on harmful text", xlabel=LAYER_LABEL,
          ylabel=f"{SCORE_LABEL}")
    a.legend(loc="best")
    for m in ds["modality"].values:
        st = _modality(str(m))
        b.plot(layers, ds["spurious_delta"].sel(modality=m), color=st["color"], marker=st["marker"], ls=st["ls"],
               label=f"neutral {st['label'].lower()}")
    bound = float(ds.attrs.get("spurious_bound", np.nan))
    b.axhline(bound, color="#555555", lw=0.8, ls=":", label=f"bound (+{bound:g})")
    b.set(title="(b) Spurious refusal added to neutral inputs", xlabel=LAYER_LABEL,
          ylabel="Refusal score increase (log-odds)")
    b.legend(loc="best")
    fb = ds.attrs.get("fallback", "")
    fig.suptitle(f"MARS layer selection on {ds.attrs.get('model_id', '')}: layer {chosen}"
                 + (f" (FALLBACK: {fb})" if fb else " (grey: layers not eligible)"))
    return _finish(fig, out_dir, name)


FIGURES = {"alignment": plot_alignment, "spurious": plot_spurious, "stability": plot_stability,
           "comparison": plot_comparison, "mars_layer_selection": plot_mars_layer_selection}
