"""A shared head: the tokens every row of a batch starts with, run once and reused as a key/value prefix.

Every prompt the package builds starts with the chat template's head (a system prompt, the
user-turn marker): on SmolLM2 24 of about 43 tokens. A reading of the last prompt columns does not
need the head's columns computed once per row: `split_head` finds the longest prefix of tokens
that every row of a left-padded batch starts with, `head_cache` runs it once (a batch of one,
`use_cache=True`) and repeats its key/value cache for every row, and `tail_inputs` are the rest of
each row (left padded to `seq_len - k`) with the attention mask over head + rest and the position
ids continuing after the head, as the full forward counts them (from each row's first token).

The tail forward's hidden states at the last `seq_len - k` columns equal the full forward's within
float tolerance (not bit for bit: the attention sums run in another order); `capture` checks that
once per model against a full forward and falls back to full forwards when it does not hold.

Applies to text-only batches (input_ids and attention_mask only, at least 2 rows) of models whose
positions are plain 1-D ids; not to media batches, mrope models (Qwen-VL) or remote traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MIN_HEAD = 4
"""Shortest head worth a second trace (tokens)."""

HEAD_RTOL = 1e-4
"""Largest difference of a shared-head result from the full forward's (relative to the largest
activation of the layer, or the largest logit) for the shared head to be used
(`capture._read_local`, `selection.select_direction`)."""


@dataclass(frozen=True)
class HeadSplit:
    """A batch cut after its shared head.

    head: `[1, k]` the shared tokens; rest: `[batch, seq_len - k]` the remaining tokens of each
    row, left padded; mask: `[batch, seq_len]` attention mask of head + rest; position_ids:
    `[batch, seq_len - k]`; k: head length; seq_len: the full batch's length.
    """

    head: torch.Tensor
    rest: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    k: int
    seq_len: int

    @property
    def n_rows(self) -> int:
        return int(self.rest.shape[0])


def supports(mm: Any) -> bool:
    """Whether the model's positions are plain ids a tail forward can continue (not mrope)."""
    base = getattr(getattr(mm, "hf", None), "model", None)
    return getattr(mm, "hf", None) is not None and getattr(base, "get_rope_index", None) is None


def split_head(inputs: dict, need_tail: int, pad_id: int, min_head: int = MIN_HEAD) -> HeadSplit | None:
    """Cut a left-padded text batch after the tokens all its rows start with, keeping at least
    `need_tail` tokens of every row after the cut (the columns a reading needs); None when there
    is nothing to share: other inputs than input_ids / attention_mask, fewer than 2 rows, or a
    head shorter than `min_head`."""
    if set(inputs) != {"input_ids", "attention_mask"}:
        return None
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, T = ids.shape
    if B < 2 or mask.shape != ids.shape:
        return None
    lengths = mask.sum(-1)
    # left padding only: every row is zeros then ones
    if not bool((mask.diff(dim=-1) >= 0).all()):
        return None
    rows = [ids[i, T - int(n):] for i, n in enumerate(lengths)]
    shortest = int(lengths.min())
    limit = shortest - int(need_tail)
    if limit < min_head:
        return None
    first = rows[0][:limit]
    same = torch.ones(limit, dtype=torch.bool)
    for r in rows[1:]:
        same &= r[:limit] == first
    k = int(same.cumprod(0).sum())
    if k < min_head:
        return None
    W = T - k
    rest = torch.full((B, W), int(pad_id), dtype=ids.dtype)
    rmask = torch.zeros((B, W), dtype=mask.dtype)
    for i, r in enumerate(rows):
        tail = r[k:]
        rest[i, W - len(tail):] = tail
        rmask[i, W - len(tail):] = 1
    pos = (k + rmask.cumsum(-1) - 1).masked_fill(rmask == 0, 1)
    full_mask = torch.cat([torch.ones((B, k), dtype=mask.dtype), rmask], 1)
    return HeadSplit(head=first[:k].unsqueeze(0), rest=rest, mask=full_mask, position_ids=pos, k=k, seq_len=T)


def head_prefill(mm: Any, split: HeadSplit, intervene: Any = None):
    """The key/value cache of the head alone (one prefill of `[1, k]`, batch 1).

    intervene: None (unsteered) or an `intervene(mm)` nnsight edit applied to the head's
    prefill: the part of an edit that a full forward would apply at the head's columns (an
    ablation at every position, an addition at every position; not a last-column edit)."""
    from .steering.sweep import _prefill

    return _prefill(mm, {"input_ids": split.head, "attention_mask": torch.ones_like(split.head)}, intervene)


def head_cache(mm: Any, split: HeadSplit, intervene: Any = None, prefilled: Any = None):
    """The head's key/value cache repeated for every row of `split`: from `prefilled` (a
    `head_prefill` of the same head under the same edit, left untouched: it is copied) or from a
    new prefill. A tail forward extends the cache it gets, so each forward needs its own."""
    import copy

    cache = copy.deepcopy(prefilled) if prefilled is not None else head_prefill(mm, split, intervene)
    cache.batch_repeat_interleave(split.n_rows)
    return cache


def tail_inputs(split: HeadSplit, cache: Any) -> dict:
    """Model inputs of the rest of each row over the head's cache (the trace's input dict)."""
    return {
        "input_ids": split.rest,
        "attention_mask": split.mask,
        "position_ids": split.position_ids,
        "past_key_values": cache,
        "cache_position": torch.arange(split.k, split.seq_len),
        "use_cache": True,
    }
