"""Which figures and tables a set of study datasets gets, and their file names.

`write_all({dataset name: Dataset}, fig_dir)` is the one function behind `mars reproduce` and
`mars figures`; a dataset's figures are named after the dataset (a model variant's datasets,
e.g. `comparison_offset_variant`, get their own files), so no dataset's figure overwrites
another's:

  alignment                  alignment.pdf|png
  refusal_curves             refusal_curves, refusal_heatmap_actadd_harmful, ..._harmless
  spurious_refusal           spurious;     spurious_<variant>_variant     the same, named
  stability                  stability
  comparison                 comparison + comparison.md / comparison.json
  comparison_<v>_variant     comparison_<v>_variant + .md
  mars_layer_selection       mars_layer_selection
Other datasets (text_selection, mars_gate, evaluate) have no figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mars_core.provenance import atomic_write_json, atomic_write_text

from . import plotting


def figure_names(name: str, ds: Any) -> list[str]:
    """The figure basenames dataset `name` gets (without extension)."""
    kind = ds.attrs.get("analysis")
    if kind == "curves":
        method = "actadd" if "actadd" in ds["method"].values else str(ds["method"].values[0])
        return ["refusal_curves"] + [f"refusal_heatmap_{method}_{p}" for p in ds["prompt_set"].values]
    if kind == "spurious":
        return ["spurious" if name == "spurious_refusal" else name]
    if kind in ("alignment", "stability", "comparison", "mars_layer_selection"):
        return [name]
    return []


def write_all(datasets: Mapping[str, Any], fig_dir: Path) -> dict[str, Path]:
    """Write every figure (PDF + PNG) and table of `datasets` into `fig_dir`; {name: path}."""
    from .comparison import comparison_json, comparison_table_markdown

    fig_dir = Path(fig_dir)
    written: dict[str, Path] = {}
    for name, ds in sorted(datasets.items()):
        kind = ds.attrs.get("analysis")
        names = figure_names(name, ds)
        if not names:
            continue
        if kind == "curves":
            plotting.plot_refusal_curves(ds, out_dir=fig_dir, name=names[0])
            for p, fig in zip(ds["prompt_set"].values, names[1:]):
                plotting.plot_refusal_heatmap(ds, method=fig.split("_")[2], prompt_set=str(p), out_dir=fig_dir,
                                              name=fig)
        else:
            plotting.FIGURES[kind](ds, out_dir=fig_dir, name=names[0])
        for n in names:
            for ext in (".pdf", ".png"):
                written[f"figure:{n}{ext}"] = fig_dir / f"{n}{ext}"
        if kind == "comparison":
            written[f"{name}.md"] = atomic_write_text(fig_dir / f"{name}.md", _table_head(ds) +
                                                      comparison_table_markdown(ds) + "\n")
            if name == "comparison":
                written["comparison.json"] = atomic_write_json(fig_dir / "comparison.json", comparison_json(ds))
    return written


def _table_head(ds: Any) -> str:
    """A line naming the model (variant) and MARS's layer and gate above a comparison table."""
    model = ds.attrs.get("model_id", "")
    variant = ds.attrs.get("model_variant", "")
    gate = ds.attrs.get("mars_gate") or {}
    g = ", ".join(f"{k} {v:g}" for k, v in gate.items()) if isinstance(gate, dict) else str(gate)
    what = f"the `{variant}` variant ({model})" if variant else model
    return (f"Methods on {what}; MARS at layer {ds.attrs.get('layer', '?')}" + (f" with gate {g}" if g else "")
            + ".\n\n")
