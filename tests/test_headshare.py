"""The shared head (mars_core.headshare): a batch's common first tokens run once and reused as a
key/value prefix by `collect_activations`.

References: the cut batch is checked token by token against the rows it came from, and against
nnsight's own mask-derived position ids of the full batch; readings over the shared head against
`share_head=False` (full forwards) and a plain transformers forward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from nnsight.modeling.processing import positions as nnsight_positions

import mars_core.capture as capture
from mars_core import collect_activations, load_model
from mars_core.headshare import split_head, supports
from mars_core.testing import FAMILIES_MULTIMODAL, FAMILIES_TEXT, build_tiny, make_image

HEAD = [5, 6, 7, 8, 9]
ROWS = [HEAD + [11, 12, 13], HEAD + [21, 22], HEAD + [31, 32, 33, 34]]
PAD = 0


def _left_padded(rows):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_split_head_cuts_after_the_common_tokens():
    inputs = _left_padded(ROWS)
    sp = split_head(inputs, need_tail=2, pad_id=PAD)
    assert sp is not None and sp.k == len(HEAD) and sp.seq_len == 9
    assert sp.head.tolist() == [HEAD]
    assert sp.rest.shape == (3, 9 - 5) and sp.mask.shape == (3, 9) and sp.position_ids.shape == (3, 4)
    full_pos = nnsight_positions(inputs["attention_mask"])
    for i, r in enumerate(ROWS):
        tail = r[len(HEAD):]
        # the rest of the row, left padded; the same last columns as the full batch
        assert sp.rest[i, -len(tail):].tolist() == tail
        assert sp.rest[i, :4 - len(tail)].eq(PAD).all()
        assert sp.rest[i, -len(tail):].tolist() == inputs["input_ids"][i, -len(tail):].tolist()
        # mask: head, then padding, then the rest
        assert sp.mask[i].tolist() == [1] * 5 + [0] * (4 - len(tail)) + [1] * len(tail)
        # positions continue after the head exactly as the full forward counts them
        assert sp.position_ids[i, -len(tail):].tolist() == full_pos[i, -len(tail):].tolist()


def test_split_head_keeps_the_needed_columns_after_the_cut():
    # rows that agree on more than the head: the cut stops `need_tail` tokens before the
    # shortest row's end
    rows = [HEAD + [40, 41, 42], HEAD + [40, 41, 42, 43]]
    sp = split_head(_left_padded(rows), need_tail=2, pad_id=PAD)
    assert sp is not None and sp.k == 6  # shortest row (8 tokens) minus 2
    assert split_head(_left_padded(rows), need_tail=5, pad_id=PAD) is None  # head of 3 < MIN_HEAD


@pytest.mark.parametrize("case", ["one row", "no common head", "media", "not left padded"])
def test_split_head_declines(case):
    inputs = _left_padded(ROWS)
    if case == "one row":
        inputs = _left_padded(ROWS[:1])
    elif case == "no common head":
        inputs = _left_padded([[1, 2, 3, 4, 5, 6], [1, 2, 9, 9, 9, 9]])
    elif case == "media":
        inputs = dict(inputs, pixel_values=torch.zeros(3, 3, 4, 4))
    else:
        inputs["attention_mask"][0] = torch.tensor([1, 0, 1, 1, 1, 1, 1, 1, 1])
    assert split_head(inputs, need_tail=1, pad_id=PAD) is None


TEXTS = ["How do I bake a cake?", "Describe it.", "What is in this picture and why is it there?",
         "Tell me a story about a dog.", "Name three colours.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def llama():
    tiny = build_tiny("llama")
    return load_model(tiny.model, tiny.tokenizer)


@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_shared_head_reading_equals_full_forward(llama, reduce):
    full = collect_activations(llama, TEXTS, reduce=reduce, batch_size=3, share_head=False)
    shared = collect_activations(llama, TEXTS, reduce=reduce, batch_size=3, share_head=True)
    var = "mean" if reduce == "mean" else "acts"
    assert full.attrs["head_tokens_shared"] == 0
    batch = llama.build_batch(TEXTS[:3])
    sp = split_head(batch.inputs, len(batch.post_positions), llama.tokenizer.pad_token_id)
    assert sp is not None and shared.attrs["head_tokens_shared"] >= sp.k * 3 > 0
    assert shared[var].dims == full[var].dims and shared[var].shape == full[var].shape
    torch.testing.assert_close(torch.from_numpy(shared[var].values), torch.from_numpy(full[var].values),
                               atol=1e-5, rtol=1e-5)
    # and against a plain transformers forward of the same batch (layer i = hidden_states[i + 1])
    if reduce == "none":
        with torch.no_grad():
            hs = llama.hf(**batch.inputs, output_hidden_states=True).hidden_states
        k = len(batch.post_positions)
        for layer in range(llama.n_layers - 1):
            torch.testing.assert_close(torch.from_numpy(shared["acts"].values[:3, layer]), hs[layer + 1][:, -k:],
                                       atol=1e-5, rtol=0)


def test_failed_check_warns_and_reads_full_forwards(monkeypatch):
    tiny = build_tiny("qwen2")
    mm = load_model(tiny.model, tiny.tokenizer)
    full = collect_activations(mm, TEXTS, reduce="none", batch_size=3, share_head=False)
    monkeypatch.setattr(capture, "HEAD_RTOL", -1.0)  # no reading can pass
    with pytest.warns(UserWarning, match="shared-head forward differs from a full forward"):
        ds = collect_activations(mm, TEXTS, reduce="none", batch_size=3, share_head=True)
    assert ds.attrs["head_tokens_shared"] == 0
    assert (ds["acts"].values == full["acts"].values).all()  # the full forward's own result
    # the verdict is kept per model: no second check, no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = collect_activations(mm, TEXTS, reduce="none", batch_size=3, share_head=True)
    assert again.attrs["head_tokens_shared"] == 0 and (again["acts"].values == full["acts"].values).all()


def test_media_batches_and_mrope_models_read_full_forwards():
    tiny = build_tiny("llava")
    mm = load_model(tiny.model, tiny.processor)
    ims = [make_image(i) for i in range(3)]
    ds = collect_activations(mm, TEXTS[:3], images=ims, reduce="none", batch_size=3, share_head=True)
    assert ds.attrs["head_tokens_shared"] == 0
    qwen = build_tiny("qwen2_vl")
    mq = load_model(qwen.model, qwen.processor)
    assert not supports(mq) and supports(mm)
    assert collect_activations(mq, TEXTS[:3], batch_size=3, share_head=True).attrs["head_tokens_shared"] == 0


@pytest.mark.parametrize("family", [f for f in FAMILIES_MULTIMODAL + FAMILIES_TEXT])
def test_every_family_text_reading_over_a_shared_head(family):
    """Text batches of every family: the shared-head reading equals a plain transformers forward
    (hidden_states[i + 1] = decoder layer i) where the head is shared, and is the full forward
    itself where it is not (mrope families, batches with more inputs than ids and mask)."""
    tiny = build_tiny(family)
    mm = load_model(tiny.model, tiny.processor or tiny.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed check would warn
        ds = collect_activations(mm, TEXTS[:4], reduce="none", batch_size=4, share_head=True)
    batch = mm.build_batch(TEXTS[:4])
    sp = split_head(batch.inputs, len(batch.post_positions), mm.tokenizer.pad_token_id or 0) if supports(mm) else None
    assert ds.attrs["head_tokens_shared"] == (sp.k * 4 if sp else 0)
    with torch.no_grad():
        hs = mm.hf(**batch.inputs, output_hidden_states=True).hidden_states
    k = len(batch.post_positions)
    for layer in range(mm.n_layers - 1):
        torch.testing.assert_close(torch.from_numpy(ds["acts"].values[:, layer]), hs[layer + 1][:, -k:], atol=1e-5, rtol=0)
