"""Streaming activation capture through nnsight.

`collect_activations` runs prompts in batches, one nnsight trace per batch, reads every
requested decoder layer's output at the requested positions in a single forward (stopping
the forward after the last requested layer), and either accumulates float64 running sums
(memory independent of the number of prompts) or returns per-prompt activations.

Positions are negative column indices into the left-padded batch: "post" means the
post-instruction tokens `batch.post_positions` (e.g. `(-5, ..., -1)`), "last" means `(-1,)`.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any, Sequence

import nnsight
import numpy as np
import torch
import xarray as xr

from .headshare import HEAD_RTOL
from .errors import InputError, MarsError
from .model import MarsModel, PromptBatch
from .provenance import make_provenance, sha256_text


def resolve_layers(mm: MarsModel, layers: Sequence[int] | int | None) -> list[int]:
    """Sorted unique layer indices (negative ones count from the end); all layers if None."""
    if layers is None:
        return list(range(mm.n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        li = int(layer)
        if not -mm.n_layers <= li < mm.n_layers:
            raise InputError(f"layer {layer} is out of range for a model with {mm.n_layers} layers")
        out.append(li % mm.n_layers)
    return sorted(set(out))


def resolve_positions(batch: PromptBatch, positions: str | Sequence[int]) -> tuple[int, ...]:
    """Negative column indices for `positions` ("post", "last" or explicit negative ints)."""
    if positions == "post":
        return batch.post_positions
    if positions == "last":
        return (-1,)
    if isinstance(positions, str):
        raise InputError(f"positions={positions!r}; use 'post', 'last' or a tuple of negative ints")
    pos = tuple(int(p) for p in positions)
    if not pos or any(p >= 0 for p in pos) or any(p < -batch.seq_len for p in pos):
        raise InputError(
            f"positions {pos} must be non-empty negative column indices (-1 is the last prompt token) "
            f"within the batch length {batch.seq_len}"
        )
    return pos


def _read(mm: MarsModel, batch: PromptBatch, layers: list[int], pos: tuple[int, ...], reduce: str, remote: bool,
          inputs: dict | None = None):
    """One trace: per layer, the sum over rows (float64) or the rows (float32) at `pos`.
    inputs: what the trace runs instead of `batch.inputs` (a shared head's `tail_inputs`)."""
    idx = list(pos)
    # no autograd graph: a reading needs none, and recording it cost ~15-20% of the forward and
    # doubled peak memory on SmolLM2-135M (benchmarks/peers.py, profile_extract.py)
    with torch.no_grad(), warnings.catch_warnings():
        # transformers 5.2x renames `past_key_values` (a FutureWarning per call); see steering.sweep
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
        with mm.nn.trace(batch.inputs if inputs is None else inputs, remote=remote) as tracer:
            got = []
            for layer in layers:
                h = mm.layers[layer].output[:, idx]  # [batch, n_pos, d_model]
                if reduce == "mean":
                    got.append(h.to(torch.float64).sum(0))  # [n_pos, d_model]
                else:
                    got.append(h.to(torch.float32))
            got = nnsight.save(got)
            if layers[-1] < mm.n_layers - 1:
                tracer.stop()
    return [g.detach().cpu() for g in got]



_HEAD_OK: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
"""model -> whether its shared-head reading matched a full forward (checked once per model)."""


def _read_local(mm: MarsModel, batch: PromptBatch, layers: list[int], pos: tuple[int, ...], reduce: str,
                share_head: bool) -> tuple[list[torch.Tensor], int]:
    """`_read` of one local batch, over a shared head when `share_head` and the batch has one
    (`headshare.split_head`): (per-layer values, head tokens shared (0: full forward)).

    The first shared reading of each model is checked against a full forward (largest difference
    <= HEAD_RTOL x the layer's largest activation); when it fails, a warning names the difference
    and the model reads with full forwards from then on."""
    from . import headshare

    ok = _HEAD_OK.get(mm)
    split = None
    if share_head and ok is not False and headshare.supports(mm):
        pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
        split = headshare.split_head(batch.inputs, max(-p for p in pos), pad)
    if split is None:
        return _read(mm, batch, layers, pos, reduce, False), 0
    got = _read(mm, batch, layers, pos, reduce, False, inputs=headshare.tail_inputs(split, headshare.head_cache(mm, split)))
    if ok is None:
        ref = _read(mm, batch, layers, pos, reduce, False)
        err = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12)) for a, b in zip(ref, got))
        _HEAD_OK[mm] = err <= HEAD_RTOL
        if err > HEAD_RTOL:
            warnings.warn(
                f"capture: the shared-head forward differs from a full forward by {err:.3g} of the largest activation "
                f"on {mm.model_id}; reading with full forwards (share_head=False skips the check)",
                stacklevel=3,
            )
            return ref, 0
    return got, split.k


def _read_item(mm: MarsModel, item):
    """One batch's `_read` inside a session (runs where the model runs): (per-layer values,
    [[per-layer finite flags]])."""
    batch, layers, pos, reduce = item
    got = _read(mm, batch, layers, pos, reduce, False)
    return got, [[bool(torch.isfinite(g).all()) for g in got]]


def _add_reads(a, b):
    """Fold two `_read_item` results of reduce="mean" (sums add, flags concatenate)."""
    return [x + y for x, y in zip(a[0], b[0])], a[1] + b[1]


def _check_finite(layers: list[int], flags, first: int, n: int) -> None:
    for layer, ok in zip(layers, flags):
        if not ok:
            raise MarsError(
                f"non-finite activations at layer {layer} for prompts {first}..{first + n - 1}; "
                "the model produced NaN/inf (try float32 instead of float16, or check the weights)"
            )


def collect_activations(
    mm: MarsModel,
    texts: Sequence[str],
    images: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    *,
    layers: Sequence[int] | int | None = None,
    positions: str | Sequence[int] = "post",
    reduce: str = "mean",
    batch_size: int = 8,
    progress: bool | None = None,
    remote: bool | str = False,
    per_session: int | None = None,
    share_head: bool = False,
) -> xr.Dataset:
    """Residual-stream activations of the language backbone at `layers` x `positions`.

    reduce="mean": returns vars `sum` `[layer, pos, d_model]` float64, `count` (prompts) and
        `mean` = sum / count; memory does not grow with the number of prompts.
    reduce="none": returns var `acts` `[prompt, layer, pos, d_model]` float32.
    Coordinates: `layer` (ints), `pos` (negative column indices), `prompt` (0..n-1).
    Attributes: provenance (model id / config hash, mars version, dtype, prompt hash,
    modality, n_prompts).
    Raises InputError for empty prompt lists or bad layers/positions, MarsError when an
    activation is not finite.
    remote: True (NDIF) or "local" (simulated round trip); default: the model's own default
        (`mars_core.remote.use_remote`), else local. Remotely, `per_session` batches (default
        `mars_core.remote.SESSION_BATCHES`) go in one nnsight session (one request), and with
        reduce="mean" the sums are added on the server, so one [layer, pos, d_model] sum
        comes back per request.
    share_head: True: locally, run the tokens every row of a text batch starts with (the chat
        template's head) once and read the rest of each row over its key/value cache
        (`mars_core.headshare`; checked once per model against a full forward; equal within float
        tolerance, not bit for bit, so off by default: remote traces, which always run full
        forwards, stay equal to local ones). attr `head_tokens_shared`: head tokens not recomputed,
        summed over rows (0: every batch ran a full forward).
    """
    if reduce not in ("mean", "none"):
        raise InputError(f"reduce={reduce!r}; use 'mean' or 'none'")
    texts = list(texts)
    if not texts:
        raise InputError("the prompt list is empty; give at least one prompt")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}; must be >= 1")
    layer_idx = resolve_layers(mm, layers)
    from .remote import SESSION_BATCHES, resolve, session_map

    mode = resolve(mm, remote)
    group = 1 if not mode else int(per_session or SESSION_BATCHES)
    if group < 1:
        raise InputError(f"per_session={per_session}; must be >= 1")
    starts = range(0, len(texts), batch_size * group)
    if progress is None:
        progress = len(starts) > 4
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"capture {len(texts)} prompts", unit="batch" if group == 1 else "request")

    sums: list[torch.Tensor] | None = None
    rows: list[list[torch.Tensor]] = [[] for _ in layer_idx]
    pos_ref: tuple[int, ...] | None = None
    modality = "text"
    shared = 0
    for i_batch, s0 in enumerate(starts):
        if i_batch and i_batch % 64 == 0:
            gc.collect()  # nnsight leaves small reference cycles per trace; keep memory flat
        batches = []
        for s in range(s0, min(s0 + batch_size * group, len(texts)), batch_size):
            sl = slice(s, s + batch_size)
            batch = mm.build_batch(
                texts[sl],
                images=None if images is None else list(images)[sl],
                videos=None if videos is None else list(videos)[sl],
            )
            modality = batch.modality
            pos = resolve_positions(batch, positions)
            if pos_ref is None:
                pos_ref = pos
            elif pos != pos_ref:
                raise MarsError(f"positions changed between batches ({pos_ref} vs {pos}); pass explicit positions")
            batches.append((s, batch, pos))
        if not mode:  # local: one trace per batch
            s, batch, pos = batches[0]
            got, k = _read_local(mm, batch, layer_idx, pos, reduce, share_head)
            shared += k * len(batch)
            _check_finite(layer_idx, [bool(torch.isfinite(g).all()) for g in got], s, len(batch))
            reads = [got]
        else:  # remote: this group of batches in one session (one request)
            items = [(batch, layer_idx, pos, reduce) for _, batch, pos in batches]
            res = session_map(mm, _read_item, items, remote=mode, per_session=group,
                              combine=_add_reads if reduce == "mean" else None)
            res = [res] if reduce == "mean" else res
            flags = [f for r in res for f in r[1]]
            for (s, batch, _), fl in zip(batches, flags):
                _check_finite(layer_idx, fl, s, len(batch))
            reads = [r[0] for r in res]
        for got in reads:
            if reduce == "mean":
                sums = got if sums is None else [a + b for a, b in zip(sums, got)]
            else:
                for r, g in zip(rows, got):
                    r.append(g)

    assert pos_ref is not None
    attrs = make_provenance(
        **mm.provenance(),
        modality=modality,
        n_prompts=len(texts),
        prompt_sha256=sha256_text(texts),
        positions=list(pos_ref),
        head_tokens_shared=int(shared),
    )
    coords = {"layer": layer_idx, "pos": list(pos_ref)}
    if reduce == "mean":
        total = torch.stack(sums).numpy()  # [layer, pos, d_model]
        ds = xr.Dataset(
            {
                "sum": (("layer", "pos", "d_model"), total),
                "count": ((), np.int64(len(texts))),
                "mean": (("layer", "pos", "d_model"), total / len(texts)),
            },
            coords=coords,
            attrs=attrs,
        )
    else:
        acts = torch.stack([torch.cat(r, 0) for r in rows], 1).numpy()  # [prompt, layer, pos, d]
        ds = xr.Dataset(
            {"acts": (("prompt", "layer", "pos", "d_model"), acts)},
            coords={**coords, "prompt": np.arange(len(texts))},
            attrs=attrs,
        )
    ds["d_model"] = np.arange(mm.d_model)
    return ds
