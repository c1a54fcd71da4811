"""Runner: raw PyTorch forward hooks on every decoder layer (the baseline; hooks live only here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def position_ids(mask):
    """Mask-derived position ids for a left-padded batch (as nnsight supplies them)."""
    pid = mask.long().cumsum(-1) - 1
    return pid.masked_fill(mask == 0, 1)


def prepare_extract(spec, model, tok, batches):
    import torch

    layers_mod, _ = common.decoder_layers(model)
    L = len(layers_mod)
    pos = list(batches["positions"])
    encs = {side: [dict(b, position_ids=position_ids(b["attention_mask"])) for b in batches[side]]
            for side in ("harmful", "harmless")}

    def extract():
        sums = {}
        cur = {}

        def hook(i):
            def fn(m, a, o):
                h = o[0] if isinstance(o, tuple) else o
                cur[i] = h[:, pos].to(torch.float64).sum(0)
            return fn

        handles = [layers_mod[i].register_forward_hook(hook(i)) for i in range(L)]
        try:
            with torch.no_grad():
                for side in ("harmful", "harmless"):
                    acc = None
                    for enc in encs[side]:
                        model(**enc)
                        got = torch.stack([cur[i] for i in range(L)])
                        acc = got if acc is None else acc + got
                    sums[side] = acc
        finally:
            for h in handles:
                h.remove()
        n_h = sum(len(b["input_ids"]) for b in encs["harmful"])
        n_s = sum(len(b["input_ids"]) for b in encs["harmless"])
        return common.mean_diff_from_sums(sums["harmful"], n_h, sums["harmless"], n_s), range(L), pos

    # plain: the same model object (hooks are removed after each extract)
    return {"extract": extract, "plain_model": model}


def prepare_steer(spec, model, tok, steer):
    """A forward hook on the layer adds the vector at the last column of each forward pass: at the
    prefill only ("first", the hook counts its calls) or at every pass ("every"); HF generate."""
    import torch

    v, layer, k, enc = steer["vector"], int(steer["layer"]), int(steer["max_new_tokens"]), steer["enc"]
    mod = common.decoder_layers(model)[0][layer]
    S = enc["input_ids"].shape[1]

    def gen(mode):
        calls = [0]

        def hook(m, a, o):
            calls[0] += 1
            if mode == "first" and calls[0] > 1:
                return o
            h = o[0] if isinstance(o, tuple) else o
            h[:, -1] = (h[:, -1].to(torch.float64) + v.to(torch.float64)).to(h.dtype)
            return o

        handle = mod.register_forward_hook(hook) if mode != "none" else None
        try:
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
        finally:
            if handle is not None:
                handle.remove()
        return out[:, S:]

    return {"gen": gen, "plain_model": model}


if __name__ == "__main__":
    sys.exit(common.main("hooks", {"extract": prepare_extract, "steer": prepare_steer}))
