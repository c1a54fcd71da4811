"""The *offset* variant: a natural organism whose image pathway carries a modality offset with
a clear component along the refusal direction.

How the offset is induced (a plain, post-hoc weight edit; no retraining):

    u = mean(E[harmful nouns]) - mean(E[harmless nouns])      # E: frozen input embeddings
    projector.linear_2.bias += gamma * u

Every projected image token is shifted by the same vector ``gamma * u`` in the language
model's input-embedding space, i.e. towards the embedding-level "harmful" direction. Text
prompts are untouched (the text-derived refusal direction is identical), while every image,
neutral images included, is pushed along the refusal direction at the steering layer.
``gamma`` is the smallest value of a fixed grid for which the neutral modality offset's
projection on the text direction at ``layer`` reaches ``target`` text gaps more than the natural
organism's. Measured with the package's own directions and calibration (text and neutral sets
of the organism's suite only).

    python -m mars_core.organism.variants --layer 2 --out mars_core/organism/weights/offset
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch

from .concepts import HARMFUL, HARMLESS

GAMMAS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def harm_embedding_direction(model, tok) -> torch.Tensor:
    E = model.get_input_embeddings().weight.detach()
    ids = lambda ws: torch.tensor(tok.convert_tokens_to_ids(ws))  # noqa: E731
    return E[ids(HARMFUL)].mean(0) - E[ids(HARMLESS)].mean(0)


def apply_offset(model, tok, gamma: float):
    """A copy of ``model`` with the projector bias shifted by ``gamma * u`` (see module doc)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.multi_modal_projector.linear_2.bias += gamma * harm_embedding_direction(model, tok)
    return m


@torch.no_grad()
def offset_ratio(model, proc, layer: int, seed: int = 0) -> float:
    """The neutral image offset's projection on the text direction at ``layer``, in text gaps
    (`MarsCalibration.at(layer)`: offset . r / (p_harm - p_safe))."""
    from ..loading import load_model
    from ..directions import RefusalDirections
    from ..steering import neutral_calibration
    from .sets import organism_suite

    mm = load_model(model, proc, family="llava", model_id="mars-organism/offset-candidate")
    s = organism_suite(seed)
    dirs = RefusalDirections.extract(mm, s["harmful_text_train"].texts, s["harmless_text_train"].texts,
                                     positions="last", layers=[layer], batch_size=64, progress=False)
    at = neutral_calibration(mm, dirs, s["neutral_text"], {"image": s["neutral_image"]}, batch_size=64).at(layer)
    return float(at["offsets"]["image"] @ at["r"]) / at["gap"]


def make_offset_variant(model, proc, layer: int, target: float = 0.35, seed: int = 0):
    """``(variant_model, gamma, history)``: the smallest grid gamma whose offset ratio at ``layer``
    exceeds the natural organism's by ``target``; history lists (gamma, ratio) tried."""
    tok = proc.tokenizer
    hist = [{"gamma": 0.0, "offset_proj_over_text_gap": offset_ratio(model, proc, layer, seed)}]
    for g in GAMMAS:
        m = apply_offset(model, tok, g)
        hist.append({"gamma": g, "offset_proj_over_text_gap": offset_ratio(m, proc, layer, seed)})
        if hist[-1]["offset_proj_over_text_gap"] - hist[0]["offset_proj_over_text_gap"] >= target:
            return m, g, hist
    return m, GAMMAS[-1], hist


def main(argv=None):
    from ..provenance import atomic_write_json, make_provenance, sha256_bytes
    from .load import load_shipped, weights_dir

    ap = argparse.ArgumentParser(description="Build the offset variant from the shipped natural organism.")
    ap.add_argument("--layer", type=int, required=True, help="the steering layer (MARS's fitted layer)")
    ap.add_argument("--out", required=True, help="weights folder to write (e.g. mars_core/organism/weights/offset)")
    ap.add_argument("--target", type=float, default=0.35)
    a = ap.parse_args(argv)
    model, proc = load_shipped("natural")
    var, gamma, hist = make_offset_variant(model, proc, a.layer, target=a.target)
    out, tmp = Path(a.out), Path(a.out).with_name(Path(a.out).name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    var.save_pretrained(tmp, safe_serialization=True)
    proc.save_pretrained(tmp)
    atomic_write_json(tmp / "organism.json", {
        "variant": "offset", "gamma": gamma, "gamma_search": hist, "layer": a.layer, "target": a.target,
        "induced_by": "model.multi_modal_projector.linear_2.bias += gamma * (mean E[harmful nouns] - mean "
                      "E[harmless nouns]) on the natural weights",
        "natural_weights_sha256": sha256_bytes((weights_dir("natural") / "model.safetensors").read_bytes()),
        "weights_sha256": sha256_bytes((tmp / "model.safetensors").read_bytes()),
        "provenance": make_provenance(kind="mars-organism-offset-variant")})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"offset variant (gamma {gamma}) written to {out}")


if __name__ == "__main__":
    main()
