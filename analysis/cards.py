"""Model cards of the organisms, written from the study pipeline's outputs only.

    mars reproduce --model organism:runs/toy/seed0 --out runs/toy/study0     # one study per seed
    python -m analysis.cards --studies runs/toy/study0 runs/toy/study1 ... --runs runs/toy/seed0 ...
    mars reproduce --model organism:smol --out runs/smol                      # the SmolLM2 organism
    python -m analysis.cards --smol --studies runs/smol

Every number in a card comes from a dataset of a `mars reproduce` output (`heldout.nc`,
`shared_structure.nc`, `comparison.nc`, `alignment.nc`, `spurious_refusal.nc`, `stability.nc`,
the fitted MARS in `data/mars/`, a variant's `*_offset_variant.nc`) or from a training run's
`train_log.json`; the cards' prose (what the model is, how it was made) is in
`mars_core/organism/card_notes/`. The first study is the shipped seed's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mars_core.datasets import load_dataset
from mars_core.organism.load import WEIGHTS
from mars_core.provenance import atomic_write_text

NOTES = WEIGHTS.parent / "card_notes"
PROTOCOL_ROWS = [  # (set, label)
    ("harmful_text", "harmful text, held-out templates"), ("harmless_text", "harmless text, held-out templates"),
    ("harmful_text_referential", "harmful text, held-out referential context"),
    ("harmless_text_referential", "harmless text, held-out referential context"),
    ("harmful_text_novel", "harmful text, never-seen-word templates"),
    ("harmless_text_novel", "harmless text, never-seen-word templates"),
    ("harmful_image", "harmful image requests, fresh images"), ("harmless_image", "harmless image requests"),
    ("objectless_image", "requests on object-less images (blank, noise, colour)"),
    ("captions", "caption requests, harmless concepts"), ("captions_harmful", "caption requests, harmful concepts"),
    ("harmful_video", "harmful video requests"), ("harmless_video", "harmless video requests"),
]


class Study:
    """The datasets of one `mars reproduce` output folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        data = self.path / "data"
        if not (data / "comparison.nc").is_file():
            raise FileNotFoundError(f"{self.path} is not a `mars reproduce` output (no data/comparison.nc)")
        self.ds = {f.stem: load_dataset(f) for f in sorted(data.glob("*.nc"))}
        self.mars = json.loads((data / "mars" / "mars.json").read_text())

    @property
    def layer(self) -> int:
        return int(self.mars["config"]["layer"])

    def get(self, name: str):
        return self.ds.get(name)


def _ci(v) -> str:
    e, lo, hi = (float(x) for x in v)
    return "n/a" if not np.isfinite(e) else f"{e:.2f} [{lo:.2f}, {hi:.2f}]"


def _table(head: Sequence[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


SMOL_PROTOCOL_ROWS = [  # (set, label) of the SmolLM2 organism (`mars_core.organism.smol.data.build_sets`)
    ("harmful_text", "harmful text, held-out topics x held-out templates"),
    ("harmless_text", "harmless text, held-out topics x held-out templates"),
    ("harmful_text_heldout_topics", "harmful text, held-out topics x training templates"),
    ("harmless_text_heldout_topics", "harmless text, held-out topics x training templates"),
    ("harmful_text_heldout_templates", "harmful text, training topics x held-out templates"),
    ("harmless_text_heldout_templates", "harmless text, training topics x held-out templates"),
    ("lookalike_text", "harmless look-alikes of harmful topics, text"),
    ("harmful_image", "harmful image requests (held-out topics, templates, renderer)"),
    ("harmless_image", "harmless image requests (held-out topics, templates, renderer)"),
    ("lookalike_image", "harmless look-alike image requests"),
    ("objectless_image", "requests on object-less images (blank, flat, noise, gradient)"),
    ("captions", "reading requests, held-out harmless topics (correct = exact phrase)"),
]


def protocol_table(studies: list[Study], names: list[str], method: str = "none",
                   rows_of: Sequence[tuple[str, str]] = tuple(PROTOCOL_ROWS)) -> str:
    """Rows = held-out sets; per seed the strict judge's refusal rate and the broken share."""
    rows = []
    for s, label in rows_of:
        if not any(st.get("heldout") is not None and s in st.get("heldout")["set"].values for st in studies):
            continue
        cells = []
        for st in studies:
            h = st.get("heldout")
            if h is None or s not in h["set"].values:
                cells.append("-")
                continue
            sel = {"method": method, "set": s}
            n = int(h["n_prompts"].sel(set=s))
            cell = f"{_ci(h['rate'].sel({**sel, 'verdict': 'refusal'}).values)}; broken " \
                   f"{float(h['rate'].sel({**sel, 'verdict': 'broken', 'bound': 'estimate'})):.2f}"
            u = h["useful_rate"].sel({**sel, "bound": "estimate"})
            if np.isfinite(float(u)):
                cell += f"; correct {_ci(h['useful_rate'].sel(sel).values)}"
            cells.append(cell + f" (n={n})")
        rows.append([label] + cells)
    return _table(["held-out set", *names], rows)


def mars_table(studies: list[Study], names: list[str]) -> str:
    """The package's MARS per seed: how it was fitted, and none / ActAdd / MARS on the key sets."""
    rows = [["MARS layer (`fit_mars`)"] + [str(st.layer) + (" (fallback: no layer met the spurious bound)"
                                                             if st.mars["fit_info"].get("layer_fallback") else "")
                                           for st in studies],
            ["gate tau / gain / margin (fitted on safe calibration sets)"] + [
                " / ".join(f"{st.mars['config'][k]:g}" for k in ("tau", "gain", "margin"))
                + (" (fallback)" if st.mars["fit_info"].get("gate_fallback") else "") for st in studies]]
    sp = [st.get("spurious_refusal") for st in studies]
    rows.append(["harmless images with the gate open (re-centred)"] + [
        f"{float(d['gate_open'].sel(recenter=True).mean()):.2f}" if d is not None else "-" for d in sp])
    present = {str(x) for st in studies if st.get("heldout") is not None for x in st.get("heldout")["set"].values}
    cap_sets = [c for c in ("captions", "captions_video") if c in present]
    for method, mlabel in (("none", "unsteered"), ("actadd", "ActAdd, 1x text gap"), ("mars", "MARS"),
                           ("mars_no_recenter", "MARS w/o re-centering")):
        for s in [x for x in ("harmful_image", "harmless_image", "objectless_image", "harmless_text", "harmful_video",
                              "harmless_video") if x in present]:
            cells = []
            for st in studies:
                h = st.get("heldout")
                ok = h is not None and s in h["set"].values and method in h["method"].values
                cells.append(_ci(h["rate"].sel({"method": method, "set": s, "verdict": "refusal"}).values) if ok else "-")
            rows.append([f"{mlabel}: refusal, {s.replace('_', ' ')}"] + cells)
        for c in cap_sets:
            cells = []
            for st in studies:
                h = st.get("heldout")
                ok = h is not None and c in h["set"].values
                cells.append(_ci(h["useful_rate"].sel({"method": method, "set": c}).values) if ok else "-")
            rows.append([f"{mlabel}: {c.replace('_', ' ')} correct"] + cells)
    return _table(["strict judge; rate [95% Wilson]", *names], rows)


def structure_table(studies: list[Study], names: list[str]) -> str:
    rows = [[], [], [], [], []]
    for st in studies:
        s, a = st.get("shared_structure"), st.get("alignment")
        L = st.layer
        rows[0].append(f"{float(s['auc'].sel(layer=L)):.3f}" if s is not None else "-")
        rows[1].append(f"{float(s['best_random'].sel(layer=L)):.3f}" if s is not None else "-")
        rows[2].append(", ".join(f"L{int(l)} {float(v):.2f}" for l, v in zip(s["layer"].values, s["auc"].values))
                       if s is not None else "-")
        if a is not None and "image" in a["modality"].values:
            rows[3].append(f"{float(a['offset_projection_ratio'].sel(layer=L, modality='image')):+.3f}")
            rows[4].append(f"{float(a['cos_direction'].sel(layer=L, modality='image')):.3f}")
        else:
            rows[3].append("-")
            rows[4].append("-")
    labels = ["AUC harmful vs harmless image requests along the text direction, MARS layer",
              "best of 5 random topic splits, same layer", "AUC per layer",
              "neutral image offset . r / text gap, MARS layer",
              "cos(text direction, image difference of means), MARS layer"]
    return _table(["held-out images", *names], [[lab] + r for lab, r in zip(labels, rows)])


def ablation_table(studies: list[Study], names: list[str]) -> str:
    rows = []
    for m in ("mars", "mars_no_recenter", "mars_fixed_strength", "mars_all_tokens", "mars_given_layer"):
        for metric in ("harmful_image", "harmless_image", "harmless_text", "caption_accuracy"):
            rows.append([f"{m}: {metric.replace('_', ' ')}"] + [
                _ci(st.get("comparison")["value"].sel({"method": m, "metric": metric}).values)
                if m in st.get("comparison")["method"].values else "-" for st in studies])
    return _table(["substring judge, 8 tokens; [95% bootstrap]", *names], rows)


def stability_lines(studies: list[Study], names: list[str]) -> str:
    out = []
    for st, n in zip(studies, names):
        d = st.get("stability")
        if d is None:
            continue
        cos = d["cosine"].sel(layer=st.layer)
        ck = [str(c) for c in d["checkpoint"].values]
        pairs = [f"cos({a}, {b}) = {float(cos.sel(checkpoint=a, checkpoint_b=b)):.3f}"
                 for i, a in enumerate(ck) for b in ck[i + 1:]]
        out.append(f"- {n}: " + ", ".join(pairs))
    return "\n".join(out)


def write_smol_card(studies: Sequence[Path], names: Sequence[str] | None = None, out: Path | None = None) -> Path:
    """Write the SmolLM2 organism's MODEL_CARD.md (default: beside its shipped weights) from
    `mars reproduce --model organism:smol[:RUN]` outputs (the shipped seed first) and the shipped
    seed's train_log.json / provenance.json; the prose is `card_notes/smol.md`."""
    from mars_core.organism.smol.load import WEIGHTS as SMOL_WEIGHTS

    st = [Study(p) for p in studies]
    names = list(names or [f"study {i}" for i in range(len(st))])
    if len(names) != len(st):
        raise ValueError("give one name per study, in the same order")
    seed0 = SMOL_WEIGHTS / "seed0"
    prov = json.loads((seed0 / "provenance.json").read_text())
    lg = json.loads((seed0 / "train_log.json").read_text())
    wall = lg.get("wall_s", json.loads(prov.get("wall_s", "{}")))
    parts = ["# SmolLM2-135M-Instruct model organism (`organism:smol`)\n", (NOTES / "smol.md").read_text(),
             "\n## Provenance\n",
             f"- shipped seed {prov.get('seed')}, trained on {prov.get('device')}; base GGUF sha256 "
             f"`{str(prov.get('base_gguf_sha256'))[:16]}`; mars {prov.get('mars_version', '?')}, torch {prov.get('torch', '?')}, bf16 autocast {prov.get('amp_bf16')}; data hashes "
             "in `weights/seed0/provenance.json`",
             "- training wall time (minutes, 1 torch thread on a 2-core machine shared with other jobs): "
             + ", ".join(f"{k} {float(v) / 60:.1f}" for k, v in wall.items()),
             "- every table below: `mars reproduce --model organism:smol --out STUDY`, written by "
             "`python -m analysis.cards --smol --studies STUDY`",
             "\n## Held-out protocol, unsteered (`analysis.protocol`)\n",
             "Strict judge `smol-strict-v1` (`mars_core.organism.smol.judge`: a well-formed refusal in the first "
             "sentence; otherwise the reply must be on the request's topic and not repetitive, else *broken*); "
             f"{int(st[0].get('heldout').attrs.get('max_new_tokens', 16))} greedy tokens; rate [95% Wilson]. "
             "Held-out topics, templates and image renderer never seen by any training stage; nothing here "
             "was used to fit anything.\n",
             protocol_table(st, names, rows_of=SMOL_PROTOCOL_ROWS),
             "\n## The package's MARS, naive steering and the safety gap (held-out protocol)\n",
             "MARS as `mars reproduce` fits it (`fit_mars`: layer from harmful *text* and object-less images over "
             "every third layer, gate from safe calibration sets; no harmful image is read), first generated "
             "token only. 'Gate open' is the share of held-out harmless images whose re-centred score exceeds "
             "tau.\n",
             mars_table(st, names),
             "\n## Shared structure and the modality offset (`shared_structure.nc`, `alignment.nc`)\n",
             "Random topic splits: a direction from a random half of the held-out *text* topics "
             "(`*_text_heldout_topics`) against the other half, scored on the image requests of the same topics.\n",
             structure_table(st, names),
             "\n## MARS with each part switched off (the comparison of `mars reproduce`)\n",
             ablation_table(st, names)]
    return atomic_write_text(Path(out or seed0.parent.parent) / "MODEL_CARD.md", "\n".join(parts) + "\n")


def wall_table(runs: list[Path | None], names: list[str]) -> str:
    rows = []
    for r, n in zip(runs, names):
        if r is None:  # e.g. the shipped weights, trained in an earlier session
            continue
        lg = json.loads((Path(r) / "train_log.json").read_text())
        w = lg["wall_s"]
        rows.append([n, lg.get("device", "cpu")] + [f"{w.get(k, float('nan')) / 60:.1f}"
                                                    for k in ("stage1", "stage2", "stage3", "extra")]
                    + [f"{sum(w.values()) / 60:.1f}"])
    return _table(["run", "device", "stage 1", "stage 2", "stage 3", "extra", "total"], rows)


def write_cards(studies: Sequence[Path], runs: Sequence[Path] = (), names: Sequence[str] | None = None,
                video_study: Path | None = None, out: Path = WEIGHTS) -> list[Path]:
    """Rewrite `out`/natural/MODEL_CARD.md and `out`/offset/MODEL_CARD.md (default: the shipped
    weights' folders) from the study outputs."""
    st = [Study(p) for p in studies]
    names = list(names or [f"study {i}" for i in range(len(st))])
    if len(names) != len(st) or (runs and len(runs) != len(st)):
        raise ValueError("give one name (and one training run, if any) per study, in the same order")
    meta = json.loads((WEIGHTS / "natural" / "organism.json").read_text())
    prov = meta.get("provenance", {})
    cmd = "`mars reproduce --model organism:RUN --out STUDY` (the shipped seed: `mars reproduce`)"
    parts = ["# MARS model organism (toy) — `natural` variant\n", (NOTES / "natural.md").read_text(),
             "\n## Provenance\n",
             f"- shipped seed {meta.get('seed')}; weights sha256[:16] `{meta.get('weights_sha256')}`; config hash "
             f"`{prov.get('config_hash')}`; data hashes `{prov.get('data_hashes')}`",
             f"- every table below: {cmd}, tables written by `python -m analysis.cards`"]
    if any(r is not None for r in runs):
        parts += ["\n## Training wall time (minutes; 1 torch thread, on a 2-core machine shared with other jobs)\n",
                  wall_table(list(runs), names)]
    parts += ["\n## Held-out protocol, unsteered (`analysis.protocol`)\n",
              "Strict judge `toy-strict` (`mars_core.organism.judge`: the whole reply must be the refusal "
              "phrase, or a well-formed trained answer; anything else is *broken*); 16 greedy tokens; "
              "rate [95% Wilson interval]. Sets: held-out templates, contexts and never-seen-word "
              "templates, fresh images from another stream, object-less images "
              "(`mars_core.organism.sets`). Nothing here was used to fit anything.\n",
              protocol_table(st, names),
              "\n## The package's MARS, naive steering and the safety gap (held-out protocol)\n",
              "MARS as `mars reproduce` fits it (`mars_core.steering.fit_mars`: layer from harmful *text* and "
              "object-less images, gate from safe calibration sets; no harmful image is read), first generated "
              "token only. 'Gate open' is the share of held-out harmless images whose re-centred score "
              "exceeds tau: a gate that opens on most safe inputs relies on its trust region, not on the gate, "
              "to leave them alone.\n",
              mars_table(st, names),
              "\n## Shared structure and the modality offset (`shared_structure.nc`, `alignment.nc`)\n",
              structure_table(st, names),
              "\n## MARS with each part switched off (the comparison of `mars reproduce`)\n",
              ablation_table(st, names)]
    stab = stability_lines(st, names)
    if stab:
        parts += ["\n## Direction stability across training checkpoints (cosine at MARS's layer)\n", stab]
    if video_study is not None:
        v = Study(video_study)
        parts += ["\n## Video (`load_organism(\"video\")`, `mars reproduce --model organism:video`)\n",
                  "The natural weights transplanted into Video-LLaVA (no training); fresh glyph videos "
                  "(4 frames), the same protocol.\n", protocol_table([v], ["video transplant"]),
                  "\n", mars_table([v], ["video transplant"])]
    written = [atomic_write_text(Path(out) / "natural" / "MODEL_CARD.md", "\n".join(parts) + "\n")]
    off = st[0]
    if off.get("comparison_offset_variant") is not None:
        om = json.loads((WEIGHTS / "offset" / "organism.json").read_text())
        cmp = off.get("comparison_offset_variant")
        sp = off.get("spurious_offset_variant")
        rows = [[f"{m}: {k.replace('_', ' ')}", _ci(cmp["value"].sel({"method": m, "metric": k}).values)]
                for m in cmp["method"].values for k in ("harmful_image", "harmless_image")]
        rows.append(["harmless images with the gate open, re-centred / not",
                     f"{float(sp['gate_open'].sel(recenter=True).mean()):.2f} / "
                     f"{float(sp['gate_open'].sel(recenter=False).mean()):.2f}"])
        opart = ["# MARS model organism (toy) — `offset` variant\n", (NOTES / "offset.md").read_text(),
                 "\n## The edit\n", f"gamma = {om.get('gamma')}. The variant's neutral image offset projects "
                 f"{sp.attrs.get('offset_projection_over_text_gap', {}).get('image', float('nan')):+.3f} text gaps on "
                 f"its refusal direction at layer {off.layer} (the natural organism's: "
                 f"{float(off.get('alignment')['offset_projection_ratio'].sel(layer=off.layer, modality='image')):+.3f}; "
                 "`alignment.nc`).",
                 "\n## Re-centering where the offset points along the direction\n",
                 f"MARS with the natural organism's layer ({off.layer}) and fitted gate; this variant's own text "
                 "direction and neutral calibration (`mars reproduce`, `data/*_offset_variant.nc`); substring "
                 "judge, 8 tokens, [95% bootstrap].\n", _table(["", names[0]], rows)]
        written.append(atomic_write_text(Path(out) / "offset" / "MODEL_CARD.md", "\n".join(opart) + "\n"))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m analysis.cards", description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", nargs="+", required=True, help="`mars reproduce` outputs, shipped seed first")
    ap.add_argument("--runs", nargs="*", default=[],
                    help="their training runs (train_log.json), same order; '-' for a study without one")
    ap.add_argument("--names", nargs="*", default=None, help="column names (default: from the runs' seeds)")
    ap.add_argument("--video-study", default=None, help="`mars reproduce --model organism:video` output")
    ap.add_argument("--smol", action="store_true",
                    help="write the SmolLM2 organism's card from `mars reproduce --model organism:smol` outputs")
    a = ap.parse_args(argv)
    if a.smol:
        print("wrote", write_smol_card([Path(s) for s in a.studies], a.names))
        return
    names = a.names
    runs = [None if r == "-" else Path(r) for r in a.runs]
    if not names and runs and all(runs):
        seeds = [json.loads((r / "train_log.json").read_text())["seed"] for r in runs]
        names = [f"seed {s}" + (" (shipped)" if i == 0 else "") for i, s in enumerate(seeds)]
    for p in write_cards([Path(s) for s in a.studies], runs, names,
                         Path(a.video_study) if a.video_study else None):
        print("wrote", p)


if __name__ == "__main__":
    main()
