"""The SmolLM2 organism's recipe: a shortened retrain runs every stage, writes a checkpoint per
stage, and is bit-identical across two runs; the encoder matches the processor; loading a stage
folder gives the trained weights exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mars_core.organism.smol import data as D
from mars_core.organism.smol.build import N_IMAGE_TOKENS, build_processor, build_tokenizer
from mars_core.organism.smol.train import Encoder, train

pytestmark = pytest.mark.slow
SCALE = 0.01  # a: 2 steps, b: 15 align + 1 reading step, c: 2 steps


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    from mars_core.organism.smol.base import load_base

    return build_tokenizer(load_base()[1])


def test_encoder_matches_processor(tok):
    import numpy as np

    proc = build_processor(tok)
    enc = Encoder(tok)
    for user, image in [("How do I fold a paper crane?", False), ("What is written in the image?", True)]:
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": user}]
        s = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        kw = {"images": [np.zeros((128, 128, 3), np.uint8)]} if image else {}
        ids = proc(text=[s], return_tensors="pt", **kw)["input_ids"][0].tolist()
        assert enc.prompt(user, image) == ids
        if image:
            assert ids.count(tok.convert_tokens_to_ids("<image>")) == N_IMAGE_TOKENS


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    a = tmp_path_factory.mktemp("run_a")
    b = tmp_path_factory.mktemp("run_b")
    la = train(0, a, steps_scale=SCALE, quiet=True)
    lb = train(0, b, steps_scale=SCALE, quiet=True)
    return a, b, la, lb


def test_shortened_retrain_is_bit_identical(two_runs):
    a, b, la, lb = two_runs
    for stage in ("a", "b", "c"):
        ta = load_file(str(a / f"stage_{stage}" / "organism.safetensors"))
        tb = load_file(str(b / f"stage_{stage}" / "organism.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (stage, k)
    assert la["stage_a_loss"] == lb["stage_a_loss"] if "stage_a_loss" in la else True


def test_checkpoint_per_stage_with_provenance(two_runs):
    a = two_runs[0]
    keys = {}
    for stage in ("a", "b", "c"):
        d = a / f"stage_{stage}"
        prov = json.loads((d / "provenance.json").read_text())
        assert prov["stage"] == stage and prov["seed"] == 0
        assert prov["base_gguf_sha256"].startswith("b179c952")
        assert json.loads(prov["data_hashes"]) == D.data_hashes(0)
        keys[stage] = set(load_file(str(d / "organism.safetensors")))
    assert any(k.startswith("lora_a.") for k in keys["a"]) and not any(k.startswith("vision.") for k in keys["a"])
    assert any(k.startswith("vision.") for k in keys["b"]) and not any(k.startswith("lora_c.") for k in keys["b"])
    assert any(k.startswith("lora_c.") for k in keys["c"])
    log = json.loads((a / "train_log.json").read_text())
    assert set(log["wall_s"]) >= {"stage_a", "stage_b", "stage_c"}


def test_stage_folder_loads_into_the_package(two_runs):
    import mars_core
    from mars_core.organism.smol.load import load_smol

    model, proc = load_smol(two_runs[0] / "stage_c")
    mm = mars_core.load_model(model, proc)
    assert mm.family.name == "llava" and mm.n_layers == 30 and mm.d_model == 576
    S = D.build_sets(0)
    b = mm.build_batch(S["harmful_image"].texts[:2], images=S["harmful_image"].images[:2])
    assert b.inputs["pixel_values"].shape[0] == 2
