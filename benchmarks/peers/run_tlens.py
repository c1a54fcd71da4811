"""Runner: TransformerLens 4.3.0 (`TransformerBridge.boot_transformers` on the loaded HF model,
`run_with_cache` of `blocks.{i}.hook_out`), in its own virtualenv benchmarks/peers/.envs/tlens."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def prepare_extract(spec, model, tok, batches):
    import torch
    import transformer_lens
    from transformer_lens.model_bridge import TransformerBridge

    plain_model, _ = common.load_model(spec)
    bridge = TransformerBridge.boot_transformers(spec["model_dir"], hf_model=model, tokenizer=tok, device="cpu")
    L = model.config.num_hidden_layers
    names = {f"blocks.{i}.hook_out" for i in range(L)}
    pos = list(batches["positions"])
    notes = ["boot_transformers forces attn_implementation='eager' (the other tools run the default sdpa)"]

    def extract():
        sums = {}
        for side in ("harmful", "harmless"):
            acc = None
            for enc in batches[side]:
                with torch.no_grad():
                    _, cache = bridge.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"],
                                                     names_filter=lambda n: n in names)
                got = torch.stack([cache[f"blocks.{i}.hook_out"][:, pos].to(torch.float64).sum(0) for i in range(L)])
                acc = got if acc is None else acc + got
            sums[side] = acc
        n_h = sum(len(b["input_ids"]) for b in batches["harmful"])
        n_s = sum(len(b["input_ids"]) for b in batches["harmless"])
        return common.mean_diff_from_sums(sums["harmful"], n_h, sums["harmless"], n_s), range(L), pos

    return {"extract": extract, "plain_model": plain_model, "notes": notes,
            "versions": {"transformer_lens": getattr(transformer_lens, "__version__", "4.3.0")}}


if __name__ == "__main__":
    sys.exit(common.main("transformer-lens", {"extract": prepare_extract}))
