#!/usr/bin/env python
"""Profile (issue 14, planning): what sharing the chat template's head would save per forward.

Every prompt the package builds starts with the same tokens (the chat template's head; for
SmolLM2 its default system prompt). This script measures, with plain transformers calls (no
nnsight, no package code on the timed path), one batch of chat-formatted requests two ways:

  full      the left-padded batch, one forward, nnsight's mask-derived position ids
  shared    the common head once (batch of 1, `use_cache=True`), its key/value cache repeated
            for every row, then one forward of the rest of each row (left padded) over it,
            positions continuing after the head

and prints the share of tokens in the head (cut by `mars_core.headshare.split_head`, which
`collect_activations(share_head=True)` uses), the largest difference of the last-column logits,
and the time of each (ABBA interleaved after a warm-up, median per-repetition ratio, cpu clock).

    python benchmarks/peers/profile_prefix.py [--n 16] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")

    from mars_core.organism.smol import data as D
    from mars_core.organism.smol.base import base_dir

    torch.set_num_threads(1)
    d = base_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    tok.padding_side = "left"
    texts = [r.text for r in random.Random(0).sample(D.combos(D.HARMFUL_TRAIN, D.TEXT_TEMPLATES_TRAIN, True), a.n)]
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts]
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = [ids[i][mask[i].bool()].tolist() for i in range(len(ids))]
    from mars_core.headshare import split_head

    sp = split_head({"input_ids": ids, "attention_mask": mask}, 1, tok.pad_token_id)  # the package's cut
    k, B, T = sp.k, *ids.shape
    pos_full = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    rest, am, rpos, head = sp.rest, sp.mask, sp.position_ids, sp.head

    def full():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos_full).logits[:, -1]

    def shared():
        with torch.no_grad():
            cache = model(input_ids=head, use_cache=True).past_key_values
            cache.batch_repeat_interleave(B)
            return model(input_ids=rest, attention_mask=am, position_ids=rpos, past_key_values=cache,
                         cache_position=torch.arange(k, T), use_cache=True).logits[:, -1]

    ref, got = full(), shared()
    err = float((ref - got).abs().max())
    ratios, tf, ts = [], [], []
    for rep in range(a.reps):
        order = (full, shared) if rep % 2 == 0 else (shared, full)
        t = {}
        for f in order:
            c0 = time.process_time()
            f()
            t[f.__name__] = time.process_time() - c0
        tf.append(t["full"])
        ts.append(t["shared"])
        ratios.append(t["shared"] / t["full"])
    print(f"{B} prompts, {T} columns padded (mean {statistics.mean(len(r) for r in rows):.1f} tokens), "
          f"shared head {k} tokens ({k / statistics.mean(len(r) for r in rows):.0%} of a prompt)")
    print(f"max |d logits| at the last column, shared vs full: {err:.2g}")
    print(f"cpu: full {statistics.median(tf):.3f} s, shared {statistics.median(ts):.3f} s, "
          f"shared / full {statistics.median(ratios):.3f} (median of {a.reps} ABBA repetitions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
