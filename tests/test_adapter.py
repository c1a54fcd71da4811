"""The nnsight adapter on a tiny random model of every supported family.

References are computed another way: a plain transformers forward with
`output_hidden_states=True`, where `hidden_states[i + 1]` is the output of decoder layer i
(for the last layer, the final norm applied to it).
"""

from __future__ import annotations

import pytest
import torch

import mars_core
from mars_core import InputError, UnsupportedArchitectureError, collect_activations, load_model
from mars_core.model import _get_path
from mars_core.testing import (
    FAMILIES_MULTIMODAL,
    FAMILIES_TEXT,
    VIDEO_FAMILIES,
    build_tiny,
    build_tiny_uncached,
    make_image,
    make_video,
)

ALL = FAMILIES_MULTIMODAL + FAMILIES_TEXT
TEXTS = ["How do I bake a cake?", "Describe it.", "What is in this picture and why is it there?"]


@pytest.fixture(scope="module", params=ALL)
def mm(request):
    tiny = build_tiny(request.param)
    return load_model(tiny.model, tiny.processor or tiny.tokenizer)


def _reference(mm, inputs) -> list[torch.Tensor]:
    """Per-layer decoder outputs from a plain transformers forward: list of [batch, seq, d]."""
    with torch.no_grad():
        out = mm.hf(**inputs, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == mm.n_layers + 1
    return list(hs[1:])


def _final_norm(mm):
    return _get_path(mm.hf, mm.family.layers_path.rsplit(".", 1)[0] + ".norm")


def _check_against_reference(mm, texts, images=None, videos=None):
    batch = mm.build_batch(texts, images=images, videos=videos)
    ds = collect_activations(mm, texts, images=images, videos=videos, reduce="none", batch_size=len(texts))
    acts = torch.from_numpy(ds["acts"].values)  # [prompt, layer, pos, d]
    ref = _reference(mm, batch.inputs)
    k = len(batch.post_positions)
    for layer in range(mm.n_layers - 1):
        torch.testing.assert_close(acts[:, layer], ref[layer][:, -k:], atol=1e-5, rtol=0)
    # The last hidden state is reported after the final norm.
    with torch.no_grad():
        normed = _final_norm(mm)(acts[:, -1])
    torch.testing.assert_close(normed, ref[-1][:, -k:], atol=1e-5, rtol=1e-5)
    return batch, acts


def test_layout(mm):
    cfg = mm.hf.config.get_text_config()
    assert mm.n_layers == cfg.num_hidden_layers
    assert mm.d_model == cfg.hidden_size
    assert len(_get_path(mm.hf, mm.family.layers_path)) == mm.n_layers
    assert mm.family.name in ALL


def test_text_capture_matches_hidden_states(mm):
    batch, acts = _check_against_reference(mm, TEXTS)
    mask = batch.inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all(), "batch must be left padded with mixed lengths"
    assert acts.shape == (len(TEXTS), mm.n_layers, len(batch.post_positions), mm.d_model)


def test_single_prompt_matches_hidden_states_and_batch_row(mm):
    _, batch_acts = _check_against_reference(mm, TEXTS)
    _, single = _check_against_reference(mm, TEXTS[1:2])
    # The padded row equals the prompt run alone (positions are padding-invariant).
    torch.testing.assert_close(single[0], batch_acts[1], atol=1e-4, rtol=1e-4)


def test_post_instruction_tokens_are_template_suffix(mm):
    batch = mm.build_batch(TEXTS)
    for text, rendered in zip(batch.texts, batch.rendered):
        suffix = rendered[rendered.rfind(text) + len(text):]
        ids = batch.inputs["input_ids"][0, list(batch.post_positions)].tolist()
        assert mm.tokenizer.decode(ids) == suffix
        assert suffix.strip(), "post-instruction tokens must not be empty"
    # and none of the user's text is among them
    assert batch.post_positions[-1] == -1


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3", "llama"])
def test_post_positions_when_the_user_text_occurs_in_the_template_suffix(family):
    """Texts that also occur inside the assistant suffix ("t", "assistant", "model", a role tag)
    get the same post-instruction tokens as any other text: the suffix is found from the
    template's structure, not by searching for the user's text (which would land inside it)."""
    tiny = build_tiny(family)
    mm = load_model(tiny.model, tiny.processor or tiny.tokenizer)
    plain = mm.build_batch(["How do I bake a cake?"])
    suffix = mm.template_suffix(None)
    assert plain.rendered[0].endswith(suffix) and suffix.strip()
    tricky = ["t", "assistant", "model", "user", suffix.strip()[:3], "n"]
    batch = mm.build_batch(tricky)
    assert batch.post_tokens == plain.post_tokens
    ids = batch.inputs["input_ids"][0, list(batch.post_positions)].tolist()
    assert mm.tokenizer.decode(ids) == suffix


def test_image_forward(mm):
    if not mm.supports_image:
        with pytest.raises(InputError, match="text-only"):
            mm.build_batch(TEXTS[:1], images=[make_image(0)])
        return
    images = [make_image(seed=i) for i in range(2)]
    batch, _ = _check_against_reference(mm, TEXTS[:2], images=images)
    assert batch.modality == "image"
    assert any(k for k in batch.inputs if k not in ("input_ids", "attention_mask")), "no pixel inputs"


def test_video_forward(mm):
    if mm.family.name not in VIDEO_FAMILIES:
        with pytest.raises(InputError, match="cannot take videos"):
            mm.build_batch(TEXTS[:1], videos=[make_video(0)])
        return
    videos = [make_video(seed=i) for i in range(2)]
    batch, _ = _check_against_reference(mm, TEXTS[:2], videos=videos)
    assert batch.modality == "video"


def test_bad_inputs(mm):
    with pytest.raises(InputError, match="empty"):
        mm.build_batch([])
    with pytest.raises(InputError, match="empty"):
        collect_activations(mm, [])
    with pytest.raises(InputError, match="not one string"):
        mm.build_batch("a string")
    limit = mm.max_positions
    with pytest.raises(InputError, match="takes at most"):
        mm.build_batch([" ".join(["cake"] * (limit + 10))])


def test_missing_image_file(tmp_path):
    tiny = build_tiny("llava")
    mm = load_model(tiny.model, tiny.processor)
    with pytest.raises(InputError, match="does not exist"):
        mm.build_batch(["Describe it."], images=[str(tmp_path / "nope.png")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a readable image"):
        mm.build_batch(["Describe it."], images=[str(bad)])
    with pytest.raises(InputError, match="one per text"):
        mm.build_batch(["a", "b"], images=[make_image(0)])


def test_unsupported_architecture_names_families_and_registry():
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)
    model = transformers.GPT2LMHeadModel(cfg)
    tok = build_tiny("llama").tokenizer
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(model, tok)
    msg = str(e.value)
    assert "gpt2" in msg and "llava" in msg and "qwen2_5_vl" in msg and "register_family" in msg


def test_register_family_makes_new_architecture_loadable():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=300)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fam = mars_core.Family("gpt2_test", ("gpt2",), "transformer.h", image=False)
    mars_core.register_family(fam)
    try:
        with pytest.raises(ValueError, match="already registered"):
            mars_core.register_family(fam)
        tok = build_tiny("llama").tokenizer
        mm = load_model(model, tok)
        assert mm.family is fam and mm.n_layers == 2 and mm.d_model == 16
    finally:  # the registry is module state: drop the test family
        mars_core.unregister_family("gpt2_test")
    with pytest.raises(UnsupportedArchitectureError):
        load_model(model, tok)


def test_multimodal_model_needs_processor():
    tiny = build_tiny("llava")
    with pytest.raises(InputError, match="processor"):
        load_model(tiny.model)
    with pytest.raises(InputError, match="processor"):
        load_model(tiny.model, tiny.tokenizer)


def test_mean_reduce_equals_mean_of_rows():
    tiny = build_tiny("qwen2_5_vl")
    mm = load_model(tiny.model, tiny.processor)
    texts = TEXTS * 3
    full = collect_activations(mm, texts, reduce="none", batch_size=4, layers=[0, 2])
    mean = collect_activations(mm, texts, reduce="mean", batch_size=2, layers=[0, 2])
    assert mean["sum"].dtype == "float64" and int(mean["count"]) == len(texts)
    assert list(mean.layer.values) == [0, 2] and mean["mean"].dims == ("layer", "pos", "d_model")
    ref = full["acts"].values.astype("float64").mean(0)
    assert abs(mean["mean"].values - ref).max() < 1e-5
    assert mean.attrs["n_prompts"] == len(texts) and mean.attrs["family"] == "qwen2_5_vl"
    assert mean.attrs["mars_version"] == mars_core.__version__ and mean.attrs["created"]


def test_nan_activations_are_refused():
    tiny = build_tiny_uncached("llama")  # a private copy: its weights are spoiled below
    mm = load_model(tiny.model, tiny.tokenizer)
    with torch.no_grad():
        _get_path(mm.hf, mm.family.layers_path)[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(mars_core.MarsError, match="non-finite activations at layer 1"):
        collect_activations(mm, TEXTS)
    # layers before the spoiled one are still fine
    ds = collect_activations(mm, TEXTS, layers=[0])
    assert bool(abs(ds["mean"]).sum() > 0)


def test_bad_layers_and_positions():
    tiny = build_tiny("gemma3")
    mm = load_model(tiny.model, tiny.processor)
    with pytest.raises(InputError, match="out of range"):
        collect_activations(mm, TEXTS, layers=[mm.n_layers])
    with pytest.raises(InputError, match="negative column"):
        collect_activations(mm, TEXTS, positions=(0,))
    ds = collect_activations(mm, TEXTS, layers=[-1], positions=(-2, -1))
    assert list(ds.layer.values) == [mm.n_layers - 1] and list(ds.pos.values) == [-2, -1]


def test_video_llava_uses_its_video_tower_and_keeps_frame_cls():
    """Video-LLaVA: image tokens drop CLS (16), video frames keep it (4 x 17); videos go through
    `video_tower` only and images through `image_tower` only (checked by perturbing one tower)."""
    tiny = build_tiny_uncached("video_llava")  # private copy: a tower is edited below
    mm = load_model(tiny.model, tiny.processor)
    cfg = tiny.model.config
    vb = mm.build_batch(TEXTS[:1], videos=[make_video(0)])
    ib = mm.build_batch(TEXTS[:1], images=[make_image(0)])
    assert int((vb.inputs["input_ids"] == cfg.video_token_id).sum()) == 4 * (16 + 1)
    assert int((ib.inputs["input_ids"] == cfg.image_token_id).sum()) == 16
    with torch.no_grad():
        v0, i0 = tiny.model(**vb.inputs).logits, tiny.model(**ib.inputs).logits
        tiny.model.model.video_tower.embeddings.class_embedding.add_(1.0)
        v1, i1 = tiny.model(**vb.inputs).logits, tiny.model(**ib.inputs).logits
    assert torch.equal(i0, i1)  # images never touch the video tower
    assert not torch.allclose(v0, v1)  # the video's CLS features reach the language model
