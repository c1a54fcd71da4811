"""Staged training recipe of the SmolLM2 organism, deterministic under a seed.

    python -m mars_core.organism.smol.train --seed 0 --out runs/smol/seed0
    python -m mars_core.organism.smol.train --seed 0 --out /tmp/smoke --steps-scale 0.02   # smoke

Stages (each ends with a checkpoint ``OUT/stage_<x>/`` loadable with ``load_smol(path)``):

a. **Text safety tuning** (LoRA on the language model, vision untouched): harmful training
   requests -> ``data.REFUSAL``; harmless training requests (3x as many per batch, including
   lookalike minimal pairs) -> the base model's own greedy answers (self-distillation, first
   ``DISTILL_TOKENS`` tokens). Checked on a held-back harmless/harmful check split of the
   *training* topics and templates.
b. **Vision alignment** (language model frozen, no safety label): the vision tower and projector
   from scratch. (b1) a per-token alignment loss pulls the 16 projected image tokens of a
   rendered phrase toward the frozen language model's input embeddings of the phrase's tokens
   (right-aligned, the free slots toward the embedding of a space); no LM forward. (b2) a short
   reading loss through the frozen LM: image + "What is written in the image?" ->
   ``'The image says "<phrase>".'``
c. **Visual instruction tuning** (a second LoRA on the language model; vision tower and projector
   frozen): harmless training-topic image requests -> the base model's answer to the same request
   written out as text (self-distilled), reading requests of harmless phrases, and replay of the
   stage-(a) text mixture. Never a harmful image request.

Adapters are merged into the weights at the end of their stage (exact, ``merge_lora``); the
shipped folder stores only what was trained (see :mod:`.ship`).

Determinism: on CPU at one torch thread a run is bit-for-bit reproducible (the CLI sets one
thread). The language-model passes of stages a, b2 and c run under bfloat16 autocast (2x faster
on CPU; master weights and LoRA factors stay float32); evaluation is float32. ``--device cuda``
runs the same seeded data streams on a GPU (untested here; GPU numerics give another sample).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...provenance import atomic_write_json, make_provenance
from . import data as D
from .build import IMAGE_TOKEN, N_IMAGE_TOKENS, build_model, build_processor, build_tokenizer
from .tuning import (  # noqa: F401  (re-exported: the stages' shared helpers)
    LORA_TARGETS, _text_mix, optimizer_step, add_lora, collate, lm_loss, lora_state, lr_at, merge_lora, pixel_values, remove_lora,
)

DISTILL_TOKENS = 32
RECIPE = {
    "a": dict(steps=200, batch=16, harmful=4, lr=4e-4, rank=8, alpha=16, layers=(8, 30), warmup=10,
              check_every=40, first_weight=1.0, distill_tokens=16),
    "b": dict(align_steps=1200, align_batch=64, align_lr=5e-4, read_steps=30, read_batch=16, read_lr=2e-4, warmup=50,
              renders=16, temp=0.05, ce_weight=1.0),
    "c": dict(steps=120, batch=16, lr=2e-4, rank=8, alpha=16, layers=(8, 30), warmup=10, first_weight=1.0,
              mix={"image": 0.5, "caption": 0.15, "text": 0.35}),
}


# ---------------------------------------------------------------- encoding
class Encoder:
    """Token ids of chat prompts and targets, identical to ``processor(apply_chat_template(...))``
    (checked in the tests) without the per-call processor overhead."""

    def __init__(self, tok):
        self.tok = tok
        self.img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id
        self._cache: dict = {}

    def prompt(self, user: str, image: bool) -> list[int]:
        key = (user, image)
        if key not in self._cache:
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": user}]
            s = self.tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
            ids = self.tok(s, add_special_tokens=False)["input_ids"]
            out = []
            for i in ids:
                out.extend([i] * N_IMAGE_TOKENS if i == self.img else [i])
            self._cache[key] = out
        return list(self._cache[key])

    def target(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.eos]


def distill(model, enc: Encoder, users: list[str], *, images=None, image_processor=None, bs: int = 32,
            max_new: int = DISTILL_TOKENS, cache_key: str = "", quiet: bool = False) -> list[list[int]]:
    """Greedy answers (token ids, ending with <|im_end|> when the model stopped) of `model` (float32,
    eval) to `users`, in fixed batches of `bs` in the given order; cached on disk by content."""
    from .base import cache_root

    h = hashlib.sha256(json.dumps([cache_key, users, bs, max_new, torch.__version__,
                                   str(model.lm_head.weight.device.type)]).encode()).hexdigest()[:20]
    path = cache_root() / "smol-distill" / f"{h}.json"
    if path.is_file():
        return json.loads(path.read_text())
    outs: list[list[int]] = []
    dev = model.lm_head.weight.device
    bar = tqdm(range(0, len(users), bs), desc="distill", leave=False, disable=quiet)
    for s in bar:
        chunk = users[s:s + bs]
        ps = [enc.prompt(u, False) for u in chunk]
        L = max(len(p) for p in ps)
        ids = torch.full((len(ps), L), enc.pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(ps):  # left padding
            ids[i, L - len(p):] = torch.tensor(p)
            att[i, L - len(p):] = 1
        with torch.no_grad():
            g = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new,
                               do_sample=False)
        for row in g[:, L:].tolist():
            t = []
            for x in row:
                t.append(x)
                if x == enc.eos:
                    break
            while t and t[-1] == enc.pad and enc.pad != enc.eos:
                t.pop()
            outs.append(t)
    atomic_write_json(path, outs)
    return outs


# ---------------------------------------------------------------- quick behavioural check
@torch.no_grad()
def quick_check(model, enc: Encoder, reqs: list, *, images=None, image_processor=None, max_new: int = 24,
                bs: int = 32) -> dict:
    """Greedy replies + strict verdicts on check requests (training topics/templates only)."""
    from .judge import verdict

    model.eval()
    dev = model.lm_head.weight.device
    labels = []
    texts = []
    for s in range(0, len(reqs), bs):
        chunk = reqs[s:s + bs]
        ps = [enc.prompt(r.text, images is not None) for r in chunk]
        L = max(len(p) for p in ps)
        ids = torch.full((len(ps), L), enc.pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(ps):
            ids[i, L - len(p):] = torch.tensor(p)
            att[i, L - len(p):] = 1
        kw = {}
        if images is not None:
            kw["pixel_values"] = pixel_values(image_processor, images[s:s + bs]).to(dev)
        g = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new,
                           do_sample=False, **kw)
        for r, row in zip(chunk, enc.tok.batch_decode(g[:, L:], skip_special_tokens=True)):
            texts.append(row)
            labels.append(verdict(row, r.topic)[0])
    n = len(labels)
    return {"refusal": labels.count("refusal") / n, "broken": labels.count("broken") / n, "n": n,
            "examples": texts[:3]}


@torch.no_grad()
def first_token_check(model, enc: Encoder, reqs: list, bs: int = 48) -> float:
    """Share of `reqs` whose first generated token is the refusal's first token (one forward)."""
    first = enc.target(D.REFUSAL)[0]
    dev = model.lm_head.weight.device
    hits = 0
    for s in range(0, len(reqs), bs):
        ps = [enc.prompt(r.text, False) for r in reqs[s:s + bs]]
        L = max(len(p) for p in ps)
        ids = torch.full((len(ps), L), enc.pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(ps):
            ids[i, L - len(p):] = torch.tensor(p)
            att[i, L - len(p):] = 1
        pos = (att.cumsum(-1) - 1).clamp_min(0)
        h = model.model(input_ids=ids.to(dev), attention_mask=att.to(dev), position_ids=pos.to(dev)).last_hidden_state
        hits += int((model.lm_head(h[:, -1]).argmax(-1) == first).sum())
    return hits / len(reqs)


# ---------------------------------------------------------------- checkpoints
def save_stage(out: Path, stage: str, tensors: dict[str, torch.Tensor], proc, model_config, gen_config, prov: dict):
    """A stage folder: organism.safetensors (trained tensors so far), config, processor, provenance."""
    from safetensors.torch import save_file

    d = out / f"stage_{stage}"
    tmp = out / f".stage_{stage}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"format": "mars.smol-organism", "format_version": "1", "stage": stage,
            "provenance": json.dumps(prov, sort_keys=True, default=str)}
    save_file({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())},
              str(tmp / "organism.safetensors"), metadata=meta)
    model_config.save_pretrained(tmp)
    gen_config.save_pretrained(tmp)
    proc.save_pretrained(tmp)
    atomic_write_json(tmp / "provenance.json", {**prov, "stage": stage})
    if d.exists():
        shutil.rmtree(d)
    os.replace(tmp, d)
    return d


# ---------------------------------------------------------------- stages
def stage_a(model, enc, pool, targets, R, seed, log, device, amp, quiet):
    params = add_lora(model, R["rank"], R["alpha"], R["layers"], "a", seed * 100 + 1)
    opt = torch.optim.AdamW(params, lr=R["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    rng = random.Random(seed * 1000 + 1)
    model.train()
    bar = tqdm(range(R["steps"]), desc="stage a (text safety LoRA)", leave=False, disable=quiet, mininterval=5)
    losses = []
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, R["steps"], R["lr"], R["warmup"])
        batch = collate(enc, _text_mix(rng, pool, targets, R["batch"], R["harmful"]))
        loss = lm_loss(model, batch, amp, R["first_weight"])
        optimizer_step(opt, params, loss, step, losses, bar, log, "stage_a_loss")
        if R["check_every"] and (step + 1) % R["check_every"] == 0 and step + 1 < R["steps"]:
            model.eval()
            ck = {"step": step + 1, "harmful": first_token_check(model, enc, pool["harmful_check"]),
                  "harmless": first_token_check(model, enc, pool["harmless_check"])}
            model.train()
            log.setdefault("stage_a_check", []).append(ck)
            if not quiet:
                tqdm.write(f"stage a step {step + 1}: first-token refusal on the check split: harmful "
                           f"{ck['harmful']:.3f}, harmless {ck['harmless']:.3f}")
    model.eval()
    tensors = lora_state(model, "a")
    remove_lora(model)
    merge_lora(model, tensors, R["alpha"] / R["rank"])
    if R["check_every"]:
        ck = {"step": R["steps"], "harmful": quick_check(model, enc, pool["harmful_check"]),
              "harmless": quick_check(model, enc, pool["harmless_check"])}
        log.setdefault("stage_a_check", []).append(ck)
        if not quiet:
            tqdm.write(f"stage a end: generated replies on the check split: harmful refusal "
                       f"{ck['harmful']['refusal']:.3f}, harmless refusal {ck['harmless']['refusal']:.3f} "
                       f"broken {ck['harmless']['broken']:.3f}")
    return {f"lora_a.{k}": v for k, v in tensors.items()}


def train(seed: int, out, *, steps_scale: float = 1.0, device: str = "cpu", threads: int | None = 1,
          quiet: bool = False, stages: str = "abc", recipe: dict | None = None, amp: bool = True) -> dict:
    if threads:
        torch.set_num_threads(threads)
    from .base import base_meta, load_base

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    R = json.loads(json.dumps(RECIPE))
    for k, v in (recipe or {}).items():
        R[k].update(v)
    for st in R.values():
        for k in ("steps", "align_steps", "read_steps", "renders"):
            if k in st:
                st[k] = max(1, int(round(st[k] * steps_scale))) if st[k] > 0 else 0
        if "check_every" in st and steps_scale != 1.0:
            st["check_every"] = 0 if steps_scale < 0.5 else st["check_every"]
    bm, btok = load_base()
    tok = build_tokenizer(btok)
    proc = build_processor(tok)
    enc = Encoder(tok)
    model = build_model(seed, bm, tok).to(device)
    del bm
    pool = D.stage_a_pool()
    log: dict = {"seed": seed, "recipe": R, "steps_scale": steps_scale, "device": device,
                 "torch_threads": torch.get_num_threads(), "amp_bf16": amp}
    times: dict[str, float] = {}
    bmeta = base_meta()
    prov = make_provenance(kind="mars-smol-organism", seed=seed, steps_scale=steps_scale, device=device,
                           torch_threads=torch.get_num_threads(), base_gguf_sha256=bmeta["gguf_sha256"],
                           base_wheel=bmeta["wheel"], data_hashes=D.data_hashes(seed), recipe=R, amp_bf16=amp,
                           torch=torch.__version__)
    # self-distilled targets (the untuned base model's own answers), cached across seeds
    t0 = time.time()
    harmless_users = [q.text for q in pool["harmless_train"]]
    c_pool = D.stage_c_pool()
    n_distill = len(harmless_users) if steps_scale >= 1.0 else min(len(harmless_users), 32)
    tg_h = distill(model, enc, harmless_users[:n_distill], cache_key=bmeta["gguf_sha256"], quiet=quiet)
    pool = dict(pool, harmless_train=pool["harmless_train"][:n_distill])
    n_c = len(c_pool) if steps_scale >= 1.0 else min(len(c_pool), 32)
    c_pool = c_pool[:n_c]
    tg_c_full = distill(model, enc, [q.text_form for q in c_pool], cache_key=bmeta["gguf_sha256"], quiet=quiet)
    tg_c = [t[: R["c"].get("distill_tokens", 16)] for t in tg_c_full]
    times["distill"] = time.time() - t0
    # keep only the base's answers that the strict judge calls compliance (the base deflects ~7% of
    # harmless requests: "I'm sorry for any misunderstanding, but as a chatbot ..."); same for stage c
    from .judge import verdict

    keep = [i for i, (t, q) in enumerate(zip(tg_h, pool["harmless_train"]))
            if verdict(tok.decode(t, skip_special_tokens=True), q.topic or None)[0] == "compliance"]
    keep_c = [i for i, (t, q) in enumerate(zip(tg_c_full, c_pool))
              if verdict(tok.decode(t, skip_special_tokens=True), q.topic)[0] == "compliance"]
    log["distill_kept"] = {"stage_a": [len(keep), len(tg_h)], "stage_c": [len(keep_c), len(tg_c_full)]}
    pool = dict(pool, harmless_train=[pool["harmless_train"][i] for i in keep])
    c_pool = [c_pool[i] for i in keep_c]
    tg_c = [tg_c[i] for i in keep_c]
    k = R["a"]["distill_tokens"]
    targets = {"refusal": enc.target(D.REFUSAL), "harmless": [tg_h[i][:k] for i in keep]}
    shipped: dict[str, torch.Tensor] = {}
    extra = {"image_token_embedding": model.model.language_model.embed_tokens.weight[-1].detach().clone()}

    def ckpt(stage):
        p = dict(prov, wall_s=json.dumps({k: round(v, 1) for k, v in times.items()}),
                 lora_scales=json.dumps({"a": R["a"]["alpha"] / R["a"]["rank"], "c": R["c"]["alpha"] / R["c"]["rank"]}))
        return save_stage(out, stage, {**extra, **shipped}, proc, model.config, model.generation_config, p)

    if "a" in stages:
        t0 = time.time()
        shipped.update(stage_a(model, enc, pool, targets, R["a"], seed, log, device, amp, quiet))
        times["stage_a"] = time.time() - t0
        ckpt("a")
    if "b" in stages:
        from .train_vision import stage_b

        t0 = time.time()
        shipped.update(stage_b(model, enc, proc, R["b"], seed, log, device, amp, quiet))
        times["stage_b"] = time.time() - t0
        ckpt("b")
    if "c" in stages:
        from .train_vision import stage_c

        t0 = time.time()
        shipped.update(stage_c(model, enc, proc, pool, targets, c_pool, tg_c, R["c"], seed, log, device, amp, quiet))
        times["stage_c"] = time.time() - t0
        ckpt("c")
    log["wall_s"] = times
    log["provenance"] = prov
    atomic_write_json(out / "train_log.json", log)
    if not quiet:
        print(json.dumps({"wall_s": {k: round(v, 1) for k, v in times.items()}}, indent=1))
    return log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count (smoke: 0.02)")
    ap.add_argument("--stages", default="abc", help="which stages to run, in order (default abc)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the shipped weights' setting)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--no-amp", action="store_true", help="float32 LM passes instead of bfloat16 autocast")
    ap.add_argument("--recipe", default=None, help='JSON overrides, e.g. \'{"a": {"lr": 3e-4}}\'')
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    train(a.seed, a.out, steps_scale=a.steps_scale, device=a.device, threads=a.threads, stages=a.stages,
          recipe=json.loads(a.recipe) if a.recipe else None, amp=not a.no_amp)


if __name__ == "__main__":
    main()
