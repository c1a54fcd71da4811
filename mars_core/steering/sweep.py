"""Fast first-token sweeps: the next-token logits of many steerers on one batch.

A first-token steerer edits only the last prompt column, so every earlier column equals the
unsteered forward's; the prompt minus its last token is run once and each steerer costs one
single-token forward over that key/value cache (`first_token_sweep`).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from .base import Steerer, to_cpu
from .baselines import NoSteer


def _prefix_positions(mm: Any, inputs: dict) -> torch.Tensor | None:
    """The position ids the full (unsteered) trace of `inputs` uses, when the model is not left to
    infer them from cache_position: mrope ids from the model's get_rope_index (Qwen-VL families)
    when the batch has media; nnsight's mask-derived ids for a left-padded text-only batch."""
    import inspect

    from nnsight.modeling.processing import positions

    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    base = getattr(getattr(mm, "hf", None), "model", None)
    gri = getattr(base, "get_rope_index", None)
    has_media = any(k.startswith("pixel_values") for k in inputs)
    if gri is not None and has_media:
        names = inspect.signature(gri).parameters
        pos, _ = gri(ids, **{k: v for k, v in inputs.items() if k in names and k != "input_ids"})
        return pos
    if not has_media and mask is not None and not bool(mask.all()):
        return positions(mask)
    return None


def first_token_sweep(mm: Any, batch: Any, steerers: Sequence[Steerer], *, reuse_prefix: bool | None = None,
                      check: bool = True, atol: float = 1e-4) -> tuple[torch.Tensor, list[dict]]:
    """Next-token logits at the last prompt column for each steerer: ([S, batch, vocab] float32, records).

    A first-token steerer edits only the last prompt column, so every earlier column is the same
    as in the unsteered forward. With reuse_prefix, the prompt minus its last token is run once
    (unsteered, through nnsight, keeping the key/value cache), and each steerer costs one
    single-token forward over that cache with its edit applied: the whole sweep costs about one
    prefill plus one decoding step per steerer. Steerers that edit other positions (directional
    ablation) get a full forward. With check, the cached path is verified once per call against
    a full unsteered forward (max |logit difference| <= atol); if it disagrees (a family whose
    positions are computed differently), the sweep falls back to full forwards with a warning.
    reuse_prefix=None (default): reuse it when the traces run locally, not when they run remotely
    (`mars_core.remote`), where the key/value cache would travel down and up again with every
    steerer; remotely each steerer is one full-forward request that returns only its logits.
    """
    import copy

    import nnsight

    from ..remote import resolve

    if reuse_prefix is None:
        reuse_prefix = not resolve(mm)
    steerers = list(steerers)
    out: list[torch.Tensor | None] = [None] * len(steerers)
    recs: list[dict] = [{} for _ in steerers]
    cached = [i for i, st in enumerate(steerers) if reuse_prefix and st.edits_last_position_only and st.scope == "first"]
    inputs = batch.inputs
    T = batch.seq_len
    if cached and T < 2:
        cached = []
    if cached:
        ids = inputs["input_ids"]
        seq_keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == ids.shape]
        pos = _prefix_positions(mm, inputs)
        pre = {k: (v[:, :-1] if k in seq_keys else v) for k, v in inputs.items()}
        last = {k: v[:, -1:] for k, v in inputs.items() if k in seq_keys and k != "attention_mask"}
        last.update({k: v for k, v in inputs.items() if k not in seq_keys and not k.startswith("pixel_values")})
        if "attention_mask" in inputs:
            last["attention_mask"] = inputs["attention_mask"]
        last["cache_position"] = torch.tensor([T - 1], device=ids.device)
        if pos is not None:
            pre["position_ids"] = pos[..., :-1]
            last["position_ids"] = pos[..., -1:]
        with torch.no_grad():
            with mm.nn.trace(pre, use_cache=True):
                cache = nnsight.save(mm.nn.output.past_key_values)

        def run_last(st):
            step_inputs = dict(last, past_key_values=copy.deepcopy(cache), use_cache=True)
            with torch.no_grad(), warnings.catch_warnings():
                # transformers 5.2x renames `past_key_values` to `cache` (a FutureWarning per call);
                # the old name is what every supported version accepts
                warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
                with mm.nn.trace(step_inputs):
                    rec = nnsight.save({})
                    st.apply(mm, batch, steps=1, record=rec)
                    lg = nnsight.save(mm.logits_envoy.output[:, -1])
            return lg.detach().float().cpu(), to_cpu(rec)

        if check:
            ref, _ = NoSteer().last_logits(mm, batch)
            got, _ = run_last(NoSteer())
            err = float((ref - got).abs().max())
            if not err <= atol:
                warnings.warn(
                    f"first_token_sweep: the cached-prefix forward differs from a full forward by {err:.3g} "
                    f"on {getattr(mm, 'model_id', 'this model')}; using full forwards",
                    stacklevel=2,
                )
                cached = []
        for i in cached:
            out[i], recs[i] = run_last(steerers[i])
    for i, st in enumerate(steerers):
        if out[i] is None:
            out[i], recs[i] = st.last_logits(mm, batch)
    return torch.stack(out), recs
