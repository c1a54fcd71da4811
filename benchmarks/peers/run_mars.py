"""Runner: the package (`mars_core.RefusalDirections.extract`), in the package's environment."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the checkout's mars_core

import common  # noqa: E402

import os  # noqa: E402

SHARE_HEAD = os.environ.get("MARS_PEERS_SHARE_HEAD") == "1"  # tool "mars-head": share_head=True
TOOL = "mars-head" if SHARE_HEAD else "mars"


def prepare_extract(spec, model, tok, batches):
    """SmolLM2: `RefusalDirections.extract` from the strings. LLaVA (image prompts): the collector
    `collect_activations(mm, texts, images=..., reduce="mean")` per side, mean difference of the
    means (RefusalDirections.extract is text-only by design: MARS directions come from text)."""
    import torch

    import mars_core
    from mars_core import RefusalDirections, collect_activations
    from mars_core.capture import _read

    plain_model, _ = common.load_model(spec)  # load_model instruments `model` in place
    mm = mars_core.load_model(model, tok)
    texts = batches["texts"]
    bs = int(spec["batch_size"])
    images = None
    if "image_ids" in batches:  # the same images the batches were built from (mars_core.testing.make_image)
        from mars_core.testing import make_image

        images = {side: [make_image(i) for i in batches["image_ids"][side]] for side in ("harmful", "harmless")}

    def extract():
        if images is None:
            rd = RefusalDirections.extract(mm, texts["harmful"], texts["harmless"], positions="post", batch_size=bs,
                                           progress=False, share_head=SHARE_HEAD)
            return rd.mean_diff, rd.layers, rd.positions
        ds = {side: collect_activations(mm, texts[side], images=images[side], positions="post", reduce="mean",
                                        batch_size=bs, progress=False) for side in ("harmful", "harmless")}
        md = torch.from_numpy(ds["harmful"]["mean"].values - ds["harmless"]["mean"].values)
        return md, [int(x) for x in ds["harmful"].layer.values], [int(x) for x in ds["harmful"].pos.values]

    # information row: the collector's per-batch trace on the prebuilt batches (no tokenizing)
    layers = list(range(mm.n_layers))
    pos = tuple(batches["positions"])
    built = {side: [mm.build_batch(texts[side][i:i + bs], images=None if images is None else images[side][i:i + bs])
                    for i in range(0, len(texts[side]), bs)] for side in ("harmful", "harmless")}
    for side in built:  # the package's own batches are the ones every tool gets
        for b, ref in zip(built[side], batches[side]):
            for k, t in ref.items():
                assert bool((b.inputs[k] == t).all()), f"batches differ from the package's ({k})"

    def read_only():
        for side in built:
            for b in built[side]:
                _read(mm, b, layers, pos, "mean", False)

    return {"extract": extract, "plain_model": plain_model, "extra": {"mars _read on prebuilt batches": read_only},
            "versions": {"mars_core": mars_core.__version__, "nnsight": __import__("nnsight").__version__}}


def prepare_steer(spec, model, tok, steer):
    """`mars_core.steering.ActAdd` with scope "first" / "every", `NoSteer` unsteered; `generate`
    builds its batch from the strings (the same ids as steer["enc"], checked)."""
    import mars_core
    from mars_core.steering import ActAdd, NoSteer

    plain_model, _ = common.load_model(spec)
    mm = mars_core.load_model(model, tok)
    v, layer, k, texts = steer["vector"], int(steer["layer"]), int(steer["max_new_tokens"]), steer["texts"]
    b = mm.build_batch(texts)
    assert bool((b.inputs["input_ids"] == steer["enc"]["input_ids"]).all()), "steer batch differs"
    steerers = {"none": NoSteer(), "first": ActAdd(v, layer, float(v.norm()), scope="first"),
                "every": ActAdd(v, layer, float(v.norm()), scope="every")}

    def gen(mode):
        return steerers[mode].generate(mm, texts, max_new_tokens=k, min_new_tokens=k).token_ids

    return {"gen": gen, "plain_model": plain_model, "versions": {"mars_core": mars_core.__version__}}


if __name__ == "__main__":
    sys.exit(common.main(TOOL, {"extract": prepare_extract} if SHARE_HEAD else {"extract": prepare_extract, "steer": prepare_steer}))
