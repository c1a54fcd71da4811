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
projection on the text direction reaches ``target`` times the harmful-harmless text gap.
"""

from __future__ import annotations

import copy

import torch

from .concepts import HARMFUL, HARMLESS
from .eval import Harness, build_sets

GAMMAS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def harm_embedding_direction(model, tok) -> torch.Tensor:
    E = model.get_input_embeddings().weight.detach()
    ids = lambda ws: torch.tensor(tok.convert_tokens_to_ids(ws))
    return E[ids(HARMFUL)].mean(0) - E[ids(HARMLESS)].mean(0)


def apply_offset(model, tok, gamma: float):
    """A copy of ``model`` with the projector bias shifted by ``gamma * u`` (see module doc)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.multi_modal_projector.linear_2.bias += gamma * harm_embedding_direction(model, tok)
    return m


@torch.no_grad()
def offset_ratio(model, proc, layer: int, seed: int = 0) -> dict:
    """Neutral offset projection on the text direction at ``layer``, in text-gap units."""
    H = Harness(model, proc)
    S = build_sets(seed)
    A = {k: H.acts(S[k], [layer])[0] for k in
         ["cal_text_harmful", "cal_text_harmless", "neutral_img", "neutral_text",
          "cal_img_harmful", "cal_img_harmless"]}
    diff = A["cal_text_harmful"].mean(0) - A["cal_text_harmless"].mean(0)
    d = diff / diff.norm()
    off = A["neutral_img"].mean(0) - A["neutral_text"].mean(0)
    img_gap = float((A["cal_img_harmful"].mean(0) - A["cal_img_harmless"].mean(0)) @ d)
    return {"offset_proj_over_text_gap": float(off @ d / diff.norm()),
            "offset_proj_over_image_gap": float(off @ d) / img_gap if img_gap else float("nan"),
            "image_gap_over_text_gap": img_gap / float(diff.norm())}


def make_offset_variant(model, proc, layer: int, target: float = 0.35, seed: int = 0):
    """``(variant_model, gamma, history)``: smallest grid gamma reaching ``target``."""
    tok = proc.tokenizer
    hist = [{"gamma": 0.0, **offset_ratio(model, proc, layer, seed)}]
    for g in GAMMAS:
        m = apply_offset(model, tok, g)
        r = offset_ratio(m, proc, layer, seed)
        hist.append({"gamma": g, **r})
        if r["offset_proj_over_text_gap"] - hist[0]["offset_proj_over_text_gap"] >= target:
            return m, g, hist
    return m, GAMMAS[-1], hist
