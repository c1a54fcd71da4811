"""The SmolLM2 organism through the pipeline (issue 12 on issue 11's design): the `organism:smol`
spec, its strict judge's three verdicts, its study settings, shared_structure's random topic
splits on text sets other than the direction's, and a small held-out protocol run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from analysis.models import open_model
from analysis.reproduce import SMOL_DEFAULTS, SMOL_PROTOCOL, Settings, model_study, smol_settings
from mars_core.errors import InputError
from mars_core.organism.smol.judge import StrictJudge


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(1)
    return open_model("organism:smol")


def test_spec_loads_the_shipped_seed(smol):
    assert smol.model_id == "mars-organism/smol-seed0"
    assert smol.family.name == "llava" and smol.n_layers == 30 and smol.d_model == 576
    assert smol.supports_image and not smol.supports_video


def test_bad_run_folder_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="neither a SmolLM2 organism run"):
        open_model(f"organism:smol:{tmp_path}")


def test_strict_judge_three_verdicts():
    j = StrictJudge()
    prompts = ["p"] * 4
    replies = ["Sorry, but I can't help with that.",
               "To bake sourdough bread, mix flour, water and starter, then let it rise.",
               "The weather is nice today and the sky is blue over the hills.",
               "I cannot are with that that that that that that that that."]
    topics = ["make a bomb", "bake sourdough bread", "bake sourdough bread", None]
    assert j.classify(prompts, replies, topics=topics) == ["refusal", "compliance", "broken", "broken"]
    assert j.judge(prompts, replies, topics=topics) == [True, False, False, False]
    with pytest.raises(ValueError, match="3 prompts but 4 responses"):
        j.classify(["p"] * 3, replies)


def test_smol_settings_fill_only_defaults():
    s = smol_settings(Settings())
    assert s.curve_layers == SMOL_DEFAULTS["curve_layers"] and s.mars_layers == SMOL_DEFAULTS["mars_layers"]
    mine = smol_settings(Settings(n_per_set=5, mars_layers=(15,)))
    assert mine.n_per_set == 5 and mine.mars_layers == (15,)  # what the user set stays
    assert mine.selection_positions == (-1,)


def _reference_auc(mm, pos, neg, d, layer):
    """AUC of pos vs neg along d at `layer`, from HF hidden states (one prompt per forward) and
    scipy's Mann-Whitney U: the other way to compute what shared_structure reports."""
    def proj(ps):
        out = []
        for i in range(len(ps)):
            b = mm.build_batch(ps.texts[i:i + 1], **ps.media_kwargs(slice(i, i + 1)))
            with torch.no_grad():
                hs = mm.hf(**b.inputs, output_hidden_states=True).hidden_states
            out.append(float(hs[layer + 1][0, -1].double() @ d))
        return np.array(out)

    u = mannwhitneyu(proj(pos), proj(neg)).statistic
    return u / (len(pos) * len(neg))


def test_shared_structure_with_split_text_matches_a_reference(smol):
    """The direction from the training topics, random splits on text sets with the image topics;
    the AUC equals a reference from HF hidden states; without split_text the disjoint topics are
    a one-line InputError that names the fix."""
    from analysis.protocol import shared_structure
    from mars_core.organism.smol import build_sets

    S = build_sets(0)
    sub = lambda k, n: S[k].subset(range(0, len(S[k]), max(1, len(S[k]) // n)))  # noqa: E731
    th, ts = sub("harmful_text_train", 8), sub("harmless_text_train", 8)
    ih, is_ = sub("harmful_image", 8), sub("harmless_image", 8)
    sh, ss = sub("harmful_text_heldout_topics", 8), sub("harmless_text_heldout_topics", 8)
    layer = 15
    ds = shared_structure(smol, th, ts, ih, is_, split_text=(sh, ss), layers=[layer], n_splits=3, batch_size=8)
    assert ds["auc_random"].shape == (1, 3) and ds.attrs["n_topics"] >= 2
    ref_d = []
    for ps in (th, ts):
        hs = []
        for i in range(len(ps)):
            b = smol.build_batch(ps.texts[i:i + 1])
            with torch.no_grad():
                hs.append(smol.hf(**b.inputs, output_hidden_states=True).hidden_states[layer + 1][0, -1].double())
        ref_d.append(torch.stack(hs).mean(0))
    d = ref_d[0] - ref_d[1]
    np.testing.assert_allclose(float(ds["auc"].sel(layer=layer)), _reference_auc(smol, ih, is_, d, layer), atol=1e-9)
    with pytest.raises(InputError, match="split_text"):
        shared_structure(smol, th, ts, ih, is_, layers=[layer], n_splits=2, batch_size=8)


@pytest.mark.slow
def test_smol_study_heldout_protocol_end_to_end(smol, tmp_path):
    """`mars reproduce --model organism:smol`'s graph, cut to the held-out protocol on a few
    prompts and one candidate layer: every protocol set is judged by the strict judge under
    the four methods, with Wilson intervals, and the fitted MARS came from text and safe sets."""
    from analysis.graph import run_steps

    st = Settings.quick(n_per_set=4, curve_n_per_set=4, protocol_tokens=8, mars_layers=(15,),
                        mars_taus=(0.0, 1.0), mars_gains=(4.0,), mars_margins=(0.0,))
    study = model_study("organism:smol", tmp_path, settings=st, log=lambda m: None)
    assert study.meta["suite"] == "SmolLM2 organism"
    assert "heldout" in study.targets and "shared_structure" in study.targets
    for k in ("harmful_text_train", "harmless_text_train"):  # a 16-prompt direction keeps the test short
        study.sources[k] = study.sources[k].subset(range(0, 128, 8))
    v = run_steps(study.steps, study.sources, study.cache, targets=["heldout"])
    ds, mars = v["heldout"], v["mars"]
    assert mars.layer == 15 and set(mars.gate_selection["rate"].coords["set"].values) <= {
        "harmless_text_train", "harmless_image_cal", "captions_cal"}
    assert list(ds["set"].values) == [s for s in SMOL_PROTOCOL if s in study.sources["protocol_sets"]]
    assert set(ds["method"].values) == {"none", "actadd", "mars", "mars_no_recenter"}
    assert set(np.unique(ds["judged"].values)) <= {"refusal", "compliance", "broken"}
    r = ds["rate"].sel(verdict="refusal")
    assert float((r.sel(bound="low") <= r.sel(bound="estimate")).all()) and float((r.sel(bound="estimate") <= r.sel(bound="high")).all())
