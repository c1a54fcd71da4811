"""Runner: repeng 0.4.0's activation reader (`repeng.extract.batched_get_hiddens`) plus a mean
difference (repeng has no mean-difference method: its `pca_diff` is a PCA), in the package's
interpreter with benchmarks/peers/.envs/repeng (numpy 1.26.4) first on sys.path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def prepare_extract(spec, model, tok, batches):
    import numpy as np
    import repeng
    import torch
    from repeng.extract import batched_get_hiddens

    if "pixel_values" in batches["harmful"][0]:
        raise NotImplementedError(
            "repeng cannot read image prompts: its reader batched_get_hiddens calls tokenizer(strings) and "
            "model(**encoded) with no way to pass pixel_values")
    L = model.config.num_hidden_layers
    bs = int(spec["batch_size"])
    rendered = batches["rendered"]
    notes = ["repeng's reader tokenizes the chat-formatted strings itself (tokenizer(batch, padding=True), "
             "left padding, no position_ids) and reads only the last non-padding token",
             "its layer L-1 is output_hidden_states[-1], which is after the final norm: compared on layers "
             f"0..{L - 2}"]
    # the same token ids as every other tool? (checked, not assumed)
    for side in ("harmful", "harmless"):
        for i, b in enumerate(batches[side]):
            enc = tok(rendered[side][i * bs:(i + 1) * bs], padding=True, return_tensors="pt")
            if not (enc["input_ids"].shape == b["input_ids"].shape and bool((enc["input_ids"] == b["input_ids"]).all())):
                notes.append(f"{side} batch {i}: repeng's tokenization differs from the package's batch")

    def extract():
        hs = {side: batched_get_hiddens(model, tok, [r for r in rendered[side]], list(range(L)), bs)
              for side in ("harmful", "harmless")}
        md = np.stack([hs["harmful"][layer].astype(np.float64).mean(0) - hs["harmless"][layer].astype(np.float64).mean(0)
                       for layer in range(L - 1)])
        return torch.from_numpy(md)[:, None], range(L - 1), [-1]

    return {"extract": extract, "plain_model": model, "notes": notes,
            "versions": {"repeng": "0.4.0", "repeng_file": repeng.__file__, "numpy": np.__version__}}


def prepare_steer(spec, model, tok, steer):
    """repeng's ControlModel adds its control at every non-padding column of every forward pass
    (the whole prompt at the prefill too): neither the last-column prefill-only edit nor the
    last-column-per-step edit can be expressed, so repeng is not compared here."""
    raise NotImplementedError(
        "repeng cannot express either edit: ControlModel.set_control adds the vector at every non-padding "
        "column of every forward pass (the whole prompt at prefill), with no position or step selection")


if __name__ == "__main__":
    sys.exit(common.main("repeng", {"extract": prepare_extract, "steer": prepare_steer}))
