#!/usr/bin/env python
"""Benchmark (issue 14, job "select"): the refusal-direction paper's candidate scoring (Arditi et
al. 2024; `andyrdt/refusal_direction`, `select_direction.py`) done three ways, same candidates,
same validation prompts, same model:

  hooks            a raw-hook re-implementation inside this benchmark (hooks live only here):
                   for every (layer, position) candidate three full forwards of the validation
                   batches, as the paper's pipeline does: harmful prompts with the direction
                   ablated (bypass score), harmless prompts with it ablated (KL of the
                   last-position next-token distribution), harmless prompts with the mean
                   difference added at the layer (induce score); then the paper's filters.
  package all      `mars_core.select_direction(scores="all")`: the same forwards as nnsight edits.
  package needed   `select_direction(scores="needed")`: the bypass score of every candidate below
                   the layer cut, then KL and induce score in ascending bypass order until one
                   candidate passes (the rest cannot change the choice); a KL stops after the
                   batches that already prove it fails the filter (per-prompt KL >= 0).
  package needed+head  the same with `share_head=True`: each batch's shared chat-template head
                   (SmolLM2's default system prompt) runs once per edit at batch 1 and the rows'
                   rest over its key/value cache.

Edit sites (all three): the component along r is removed from the input of layer 0 and from the
output of every decoder layer at every position (the package's `ablate_direction`); the paper
also removes it from each attention and MLP output inside the layers, so its numbers differ
slightly from these; the induce vector is added to layer l's output at every position. The hook
baseline reuses the package's score formulas (`first_token_refusal_score`, `kl_divergence`) and
filter (`choose_candidate`): what is timed and checked is the forwards.

Model: the SmolLM2-135M-Instruct organism (`organism:smol`, seed 0, real weights, offline),
float32, one torch thread; text prompts through its language model. Directions from 64 + 64
training prompts (`analysis.reproduce.default_suite`, seed 0) at every layer and post-instruction
position; validation: N held-out harmful + N held-out harmless requests (`harmful_text`,
`harmless_text`: topics and templates no training stage saw).
Agreement before the ratio counts: the three choose the same (layer, position); package all vs
hooks: max |difference| of bypass and induce scores <= 1e-4 log-odds and of KL <= 1e-4 nats over
every candidate (float32 forwards); package needed's scored entries equal package all's, and its
bounded KLs' lower bounds lie between the threshold and all's KL; needed+head's scored entries
within 1e-4 of all's (a shared head is equal within float tolerance, not bit for bit).
Timing: each variant once, one after the other in this process, both clocks (a variant is
minutes; the wall/cpu pair shows the machine's drift). Target (PASS/FAIL, exit 1 on FAIL): hooks /
package needed+head >= 5 on the cpu clock at the same choice. Also printed: package all / hooks
(the cost of nnsight edits at equal work), hooks / package needed, and the forwards each ran.

    python benchmarks/select_sweep.py --quick    # layers 0,3,...,27, 8 + 8 prompts, batches of 4 (a few minutes)
    python benchmarks/select_sweep.py            # every layer, 32 + 32 prompts, batches of 8
    python benchmarks/select_sweep.py --skip-all # the same without package all (checked against the hooks)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET = 5.0


def hooks_select(hf, layers_mod, dirs, hb, sb, cand_layers, cand_pos, refusal_ids, n_layers, counter):
    """The paper's pipeline with raw forward hooks on `layers_mod` (the decoder layers of `hf`):
    every score of every candidate; returns (bypass, induce, kl) [layer, pos] and the choice."""
    import numpy as np
    import torch

    from mars_core.scoring import first_token_refusal_score, kl_divergence
    from mars_core.selection import choose_candidate

    def first(o):
        return o[0] if isinstance(o, tuple) else o

    def proj(h, r):
        hf32 = h.float()
        return (hf32 - (hf32 @ r).unsqueeze(-1) * r).to(h.dtype)

    def ablation_hooks(r):
        def pre(m, args, kwargs):
            if args:
                return (proj(args[0], r),) + tuple(args[1:]), kwargs
            return args, dict(kwargs, hidden_states=proj(kwargs["hidden_states"], r))

        def post(m, a, o):
            h = first(o)
            h[:] = proj(h, r)
            return o

        return [layers_mod[0].register_forward_pre_hook(pre, with_kwargs=True)] + \
               [mod.register_forward_hook(post) for mod in layers_mod]

    def add_hook(v, layer):
        def post(m, a, o):
            h = first(o)
            h[:] = (h.float() + v).to(h.dtype)
            return o

        return [layers_mod[layer].register_forward_hook(post)]

    def logits(batches, hooks=()):
        try:
            with torch.no_grad():
                out = torch.cat([hf(**b.inputs).logits[:, -1].float() for b in batches])
        finally:
            for h in hooks:
                h.remove()
        counter[0] += len(batches)
        return out

    logits(hb)  # the harmful baseline (the paper computes it too; the package reports it)
    base_s_logits = logits(sb)
    L, P = len(cand_layers), len(cand_pos)
    bypass, induce, kl = np.zeros((L, P)), np.zeros((L, P)), np.zeros((L, P))
    for i, l in enumerate(cand_layers):
        for j, p in enumerate(cand_pos):
            v64 = dirs.direction(l, p, unit=False).double()
            v, r = v64.float(), (v64 / v64.norm()).float()
            bypass[i, j] = first_token_refusal_score(logits(hb, ablation_hooks(r)), refusal_ids).mean()
            kl[i, j] = kl_divergence(base_s_logits, logits(sb, ablation_hooks(r))).mean()
            induce[i, j] = first_token_refusal_score(logits(sb, add_hook(v, l)), refusal_ids).mean()
    ch = choose_candidate(bypass, induce, kl, cand_layers, n_layers)
    return bypass, induce, kl, (cand_layers[ch["index"][0]], cand_pos[ch["index"][1]]), ch["fallback"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="validation prompts per side (quick 8, full 32)")
    ap.add_argument("--layers", default=None, help="candidate layers (quick 0,3,...,27; full every layer)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per batch (quick 4, full 8)")
    ap.add_argument("--skip-all", action="store_true",
                    help="do not run package all (the needed variants are then checked against the hooks' maps)")
    a = ap.parse_args(argv)
    n = a.n or (8 if a.quick else 32)
    a.batch_size = a.batch_size or (4 if a.quick else 8)
    if a.batch_size < 1 or n < 1:
        ap.error("--n and --batch-size must be positive")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np

    from analysis.reproduce import cap
    from mars_core.model import _get_path
    from mars_core.organism.smol.load import load_smol
    from mars_core.scoring import refusal_token_ids
    from mars_core.selection import choose_candidate, chosen, select_direction
    from organism_setup import smol_setup

    mm, s, dirs = smol_setup("select_sweep")
    layers = ([int(x) for x in a.layers.split(",")] if a.layers else
              (list(range(0, mm.n_layers, 3)) if a.quick else list(range(mm.n_layers))))
    harmful, harmless = cap(s["harmful_text"], n).texts, cap(s["harmless_text"], n).texts
    positions = list(dirs.positions)
    ids = refusal_token_ids(mm.tokenizer)
    print(f"model {mm.model_id}: {len(layers)} layers x {len(positions)} post-instruction positions = "
          f"{len(layers) * len(positions)} candidates; validation {n} held-out harmful + {n} held-out harmless "
          f"requests, batches of {a.batch_size}", flush=True)

    hf, _proc = load_smol()  # the baseline's own copy, no nnsight wrapper
    hf.eval()
    layers_mod = _get_path(hf, mm.family.layers_path)
    hb = [mm.build_batch(harmful[i:i + a.batch_size]) for i in range(0, n, a.batch_size)]
    sb = [mm.build_batch(harmless[i:i + a.batch_size]) for i in range(0, n, a.batch_size)]

    def package(scores, share_head=False):
        return select_direction(mm, dirs, harmful, harmless, layers=layers, refusal_ids=ids,
                                batch_size=a.batch_size, scores=scores, share_head=share_head)

    res = {}
    variants = ("hooks",) + (() if a.skip_all else ("package all",)) + ("package needed", "package needed+head")
    for name in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c0, t0 = time.process_time(), time.perf_counter()
            if name == "hooks":
                cnt = [0]
                out = hooks_select(hf, layers_mod, dirs, hb, sb, layers, positions, ids, mm.n_layers, cnt)
                n_fwd = cnt[0]
            else:
                mode = name.split()[1]
                out = package(mode.split("+")[0], share_head=mode.endswith("+head"))
                n_fwd = out.attrs["n_forwards"]
            res[name] = (out, time.perf_counter() - t0, time.process_time() - c0, n_fwd)
        ch = out[3] if name == "hooks" else chosen(out)
        print(f"  {name}: {res[name][1]:.1f} s wall, {res[name][2]:.1f} s cpu, {n_fwd} batch forwards; "
              f"chose layer {ch[0]}, position {ch[1]}", flush=True)

    hk, lazy, head = res["hooks"][0], res["package needed"][0], res["package needed+head"][0]
    full = res["package all"][0] if "package all" in res else None
    names = ("bypass_score", "induce_score", "kl")
    hk_maps = dict(zip(names, hk[:3]))
    # the reference every package variant is checked against: package all (exact for needed), or
    # with --skip-all the hooks' maps (within the float bound)
    ref = {v: full[v].values for v in names} if full is not None else hk_maps
    ref_name, exact_tol = ("all's", 0.0) if full is not None else ("the hooks'", 1e-4)
    ch = choose_candidate(ref["bypass_score"], ref["induce_score"], ref["kl"], layers, mm.n_layers)
    d = {}
    if full is not None:
        d = {k: float(np.max(np.abs(full[v].values - hk_maps[v]))) for k, v in
             zip(("bypass", "induce", "kl"), names)}
    thr = float(lazy.attrs["kl_threshold"])

    def check(ds, tol):
        """(scored counts, max |d| of scored entries from ref, bounded KLs ok, n bounded)"""
        m = {v: ds[f"scored_{k}"].values for k, v in zip(("bypass", "kl", "induce"), ("bypass_score", "kl",
                                                                                    "induce_score"))}
        dd = max(float(np.max(np.abs(ds[v].values[mk] - ref[v][mk]), initial=0.0)) for v, mk in m.items())
        bk = ds["bounded_kl"].values
        lb = ds["kl_lower_bound"].values[bk]
        ok = bool(((lb >= thr) & (lb <= ref["kl"][bk] + tol + 1e-12)).all())
        return {v: int(mk.sum()) for v, mk in m.items()}, dd, ok, int(bk.sum())

    same = hk[3] == chosen(lazy) == chosen(head) and (full is None or chosen(full) == hk[3])
    (ln, ld, lok, lnb), (hn, hd, hok, hnb) = check(lazy, exact_tol), check(head, 1e-4)
    agree = same and all(x <= 1e-4 for x in d.values()) and ld <= exact_tol and lok and hd <= 1e-4 and hok
    print("\nagreement: same choice " + str(same) + ("; package all vs hooks max |d| bypass {bypass:.2g}, induce "
          "{induce:.2g} log-odds, KL {kl:.2g} nats (bound 1e-4 each)".format(**d) if d else "; package all skipped"))
    for nm, (cnt, dd, ok, nb), tol in (("needed", (ln, ld, lok, lnb), exact_tol), ("needed+head", (hn, hd, hok, hnb), 1e-4)):
        print(f"agreement, {nm}: " + ", ".join(f"{c} {v}" for v, c in cnt.items()) + f" scores within {dd:.2g} of "
              f"{ref_name} (bound {tol:g}); {nb} KLs bounded early, bounds within [threshold, {ref_name} KL"
              f"{' + 1e-4' if tol else ''}]: {ok}")
    print(f"needed+head: head check rel. err {head.attrs['head_check_rel_err']:.2g}, "
          f"{head.attrs['n_head_prefills']} head prefills (batch 1)")
    below = int(ch["pass_layer"].sum())
    print(f"(filters over the {ch['passes'].size} candidates, from {ref_name} maps: {below} below the layer cut, "
          f"{int(ch['pass_kl'].sum())} pass KL < {thr}, {int(ch['pass_induce'].sum())} pass induce > "
          f"{lazy.attrs['induce_threshold']}, {int(ch['passes'].sum())} pass all)")
    fb = lazy.attrs.get("fallback", "")
    print(f"(choice: {'FALLBACK: ' + fb if fb else 'passes every filter'}; {int(ch['passes'].sum())} of "
          f"{ch['passes'].size} candidates pass)")
    t = {k: v[2] for k, v in res.items()}
    w = {k: v[1] for k, v in res.items()}
    if full is not None:
        print(f"package all / hooks: cpu {t['package all'] / t['hooks']:.3f}x, wall "
              f"{w['package all'] / w['hooks']:.3f}x (equal work: {res['package all'][3]} vs {res['hooks'][3]} forwards)")
    for k in ("package needed", "package needed+head"):
        print(f"hooks / {k}: cpu {t['hooks'] / t[k]:.2f}x, wall {w['hooks'] / w[k]:.2f}x ({res['hooks'][3]} vs "
              f"{res[k][3]} batch forwards)")
    r_cpu = t["hooks"] / t["package needed+head"]
    good = agree and r_cpu >= TARGET
    print(f"target: hooks / package needed+head >= {TARGET:g} (cpu) at the same choice: {'PASS' if good else 'FAIL'}")
    print(f"overall: {'PASS' if good else 'FAIL'}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
