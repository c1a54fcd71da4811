"""Runner: TransformerLens 4.3.0 (`TransformerBridge.boot_transformers` on the loaded HF model),
in its own virtualenv benchmarks/peers/.envs/tlens. extract: `run_with_cache` of
`blocks.{i}.hook_out`; steer: a hook on `blocks.{layer}.hook_out` inside `bridge.hooks(...)` around
the bridge's own greedy `generate`, without its key/value cache (see prepare_steer)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def prepare_extract(spec, model, tok, batches):
    import torch
    import transformer_lens
    from transformer_lens.model_bridge import TransformerBridge

    plain_model, _ = common.load_model(spec)
    tok = getattr(tok, "tokenizer", tok)  # LLaVA: the bridge takes the processor's tokenizer, not the processor
    bridge = TransformerBridge.boot_transformers(spec["model_dir"], hf_model=model, tokenizer=tok, device="cpu")
    L = len(common.decoder_layers(model)[0])
    names = {f"blocks.{i}.hook_out" for i in range(L)}
    pos = list(batches["positions"])
    notes = ["boot_transformers forces attn_implementation='eager' (the other tools run the default sdpa)"]

    def extract():
        sums = {}
        for side in ("harmful", "harmless"):
            acc = None
            for enc in batches[side]:
                with torch.no_grad():
                    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}  # pixel_values
                    _, cache = bridge.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"],
                                                     names_filter=lambda n: n in names, **extra)
                got = torch.stack([cache[f"blocks.{i}.hook_out"][:, pos].to(torch.float64).sum(0) for i in range(L)])
                acc = got if acc is None else acc + got
            sums[side] = acc
        n_h = sum(len(b["input_ids"]) for b in batches["harmful"])
        n_s = sum(len(b["input_ids"]) for b in batches["harmless"])
        return common.mean_diff_from_sums(sums["harmful"], n_h, sums["harmless"], n_s), range(L), pos

    return {"extract": extract, "plain_model": plain_model, "notes": notes,
            "versions": {"transformer_lens": getattr(transformer_lens, "__version__", "4.3.0")}}


def prepare_steer(spec, model, tok, steer):
    """The vector added to `blocks.{layer}.hook_out` (the layer's residual output) in the bridge's
    greedy `generate` WITHOUT its key/value cache: its cached loop gives wrong tokens on SmolLM2
    (checked in `gen`), so every pass recomputes the whole sequence, and the edit goes where the
    cached edits amount to: the prompt's last column at every pass ("first": only that column was
    edited at the prefill, and later tokens see it through the cache) or that column and every
    generated one ("every")."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    plain_model, _ = common.load_model(spec)
    bridge = TransformerBridge.boot_transformers(spec["model_dir"], hf_model=model, tokenizer=tok, device="cpu")
    v, layer, k, enc = steer["vector"], int(steer["layer"]), int(steer["max_new_tokens"]), steer["enc"]
    S = enc["input_ids"].shape[1]
    name = f"blocks.{layer}.hook_out"

    def run(mode, cached=False):
        cols: list[int] = []  # columns of each pass: S, S + 1, ... without the cache

        def hook(h, hook):
            cols.append(h.shape[1])
            end = S if mode == "first" else h.shape[1]
            h[:, S - 1:end] = (h[:, S - 1:end].to(torch.float64) + v.to(torch.float64)).to(h.dtype)
            return h

        with torch.no_grad(), bridge.hooks(fwd_hooks=[(name, hook)] if mode != "none" else []):
            out = bridge.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=k,
                                  do_sample=False, stop_at_eos=False, use_past_kv_cache=cached, verbose=False)
        if mode != "none" and cols != [S + i for i in range(len(cols))]:
            raise RuntimeError(f"passes of {cols[:4]}... columns: not one full pass per token")
        return out[:, S:]

    def gen(mode):
        return run(mode)

    # the reason the cache is off, measured here: unsteered tokens with the cache vs without
    with_cache = run("none", cached=True)
    without = run("none")
    frac = float((with_cache == without).float().mean())
    notes = ["boot_transformers forces attn_implementation='eager' (the other tools run the default sdpa)",
             f"generate without its key/value cache (use_past_kv_cache=False): with the cache its unsteered tokens match "
             f"its own uncached ones at {frac:.0%} (from the second token on it repeats one token), so each pass "
             "recomputes the whole sequence; the edit is at the prompt's last column (first) or there and at every "
             "generated column (every), what the KV-cached edits amount to"]
    return {"gen": gen, "plain_model": plain_model, "notes": notes}


if __name__ == "__main__":
    sys.exit(common.main("transformer-lens", {"extract": prepare_extract, "steer": prepare_steer}))
