"""Runner: nnterp 1.3.0 (`StandardizedTransformer`, `layers_output[i]` in a trace), in its own
virtualenv benchmarks/peers/.envs/nnterp (nnsight 0.7.0, torch 2.13.0 CPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def prepare_extract(spec, model, tok, batches):
    import nnsight
    import nnterp
    import torch
    from nnterp import StandardizedTransformer

    plain_model, _ = common.load_model(spec)  # nnsight wraps `model`'s modules
    st = StandardizedTransformer(model, tokenizer=tok)
    L = st.num_layers
    pos = list(batches["positions"])

    def extract():
        sums = {}
        for side in ("harmful", "harmless"):
            acc = None
            for enc in batches[side]:
                got = []  # created outside the trace: a list made inside it is unbound after it (nnsight)
                # no_grad, as a user extracting activations would: a trace otherwise records the
                # autograd graph, and the saved sums keep every batch's graph alive
                with torch.no_grad(), st.trace(dict(enc)):  # ids, mask (and pixel_values for LLaVA)
                    for i in range(L):
                        got.append(st.layers_output[i][:, pos].to(torch.float64).sum(0).save())
                got = torch.stack([g.value if hasattr(g, "value") else g for g in got])
                acc = got if acc is None else acc + got
            sums[side] = acc
        n_h = sum(len(b["input_ids"]) for b in batches["harmful"])
        n_s = sum(len(b["input_ids"]) for b in batches["harmless"])
        return common.mean_diff_from_sums(sums["harmful"], n_h, sums["harmless"], n_s), range(L), pos

    return {"extract": extract, "plain_model": plain_model,
            "versions": {"nnterp": getattr(nnterp, "__version__", "1.3.0"), "nnsight": nnsight.__version__}}


def prepare_steer(spec, model, tok, steer):
    """`StandardizedTransformer.steer(layer, v, token_positions=-1)` inside `generate`: outside any
    iter loop it edits the prefill only ("first"); inside `for _ in tracer.iter[:k]` every pass."""
    import torch
    from nnterp import StandardizedTransformer

    plain_model, _ = common.load_model(spec)
    st = StandardizedTransformer(model, tokenizer=tok)
    v, layer, k, enc = steer["vector"].to(torch.float32), int(steer["layer"]), int(steer["max_new_tokens"]), steer["enc"]
    S = enc["input_ids"].shape[1]
    inp = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def gen(mode):
        with torch.no_grad():
            with st.generate(max_new_tokens=k, min_new_tokens=k, do_sample=False) as tracer:
                with tracer.invoke(inp):
                    if mode == "first":
                        st.steer(layer, v, token_positions=-1)
                    elif mode == "every":
                        for _ in tracer.iter[:k]:
                            st.steer(layer, v, token_positions=-1)
                with tracer.invoke():
                    ids = tracer.result.save()
        ids = ids.value if hasattr(ids, "value") else ids
        return ids[:, S:]

    return {"gen": gen, "plain_model": plain_model}


if __name__ == "__main__":
    sys.exit(common.main("nnterp", {"extract": prepare_extract, "steer": prepare_steer}))
