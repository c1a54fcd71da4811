"""Runner: steering-vectors 0.12.2 (`record_activations` + `aggregate_activations(mean_aggregator())`),
in the package's interpreter with benchmarks/peers/.envs/sv first on sys.path."""

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def prepare_extract(spec, model, tok, batches):
    import steering_vectors
    import torch
    from steering_vectors import record_activations
    from steering_vectors.aggregators import mean_aggregator
    from steering_vectors.train_steering_vector import aggregate_activations

    pos = list(batches["positions"])
    agg = mean_aggregator()
    # the decoder blocks named explicitly: on LLaVA the library's guess would find the vision
    # tower's encoder layers too
    path = common.decoder_layers(model)[1]
    layer_config = {"decoder_block": path + ".{num}"}

    def extract():
        # the library's own pipeline (train_steering_vector's extract + aggregate), given the
        # batches' input_ids/attention_mask instead of letting it tokenize; all positions are
        # recorded, so every post-instruction position is read from one forward
        acts = {"harmful": defaultdict(list), "harmless": defaultdict(list)}
        with torch.no_grad():
            for side in acts:
                for enc in batches[side]:
                    with record_activations(model, layer_type="decoder_block", layer_config=layer_config) as rec:
                        model(**enc)
                    for layer, a in rec.items():
                        acts[side][layer].append(a[-1][:, pos])
        layers = sorted(acts["harmful"])
        per_pos = []
        for j in range(len(pos)):
            h = {layer: [a[:, j] for a in acts["harmful"][layer]] for layer in layers}
            s = {layer: [a[:, j] for a in acts["harmless"][layer]] for layer in layers}
            vec = aggregate_activations(h, s, agg)  # {layer: mean(harmful) - mean(harmless)}
            per_pos.append(torch.stack([vec[layer] for layer in layers]))
        return torch.stack(per_pos, 1), layers, pos

    return {"extract": extract, "plain_model": model,
            "versions": {"steering_vectors": getattr(steering_vectors, "__version__", "0.12.2"),
                         "steering_vectors_file": steering_vectors.__file__}}


def prepare_steer(spec, model, tok, steer):
    """`SteeringVector.apply(model, token_indices=[-1])` around HF generate: the last column of
    every forward pass ("every"). token_indices / min_token_index index the columns of each
    forward pass, and with the key/value cache every pass after the prefill has one column, so
    an edit at the prefill only cannot be expressed."""
    import torch
    from steering_vectors import SteeringVector

    v, layer, k, enc = steer["vector"], int(steer["layer"]), int(steer["max_new_tokens"]), steer["enc"]
    sv = SteeringVector({layer: v.to(torch.float32)}, "decoder_block")
    S = enc["input_ids"].shape[1]

    def gen(mode):
        with torch.no_grad():
            if mode == "none":
                out = model.generate(**enc, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            else:
                # apply() defaults min_token_index=0, which it refuses beside token_indices: pass None
                with sv.apply(model, min_token_index=None, token_indices=[-1]):
                    out = model.generate(**enc, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
        return out[:, S:]

    return {"gen": gen, "plain_model": model,
            "cannot": {"first": "token_indices/min_token_index index the columns of each forward pass; with the "
                                "KV cache every step after the prefill has one column, so a prefill-only edit "
                                "cannot be expressed"}}


if __name__ == "__main__":
    sys.exit(common.main("steering-vectors", {"extract": prepare_extract, "steer": prepare_steer}))
