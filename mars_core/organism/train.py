"""Staged training recipe of the organism (issue 4), deterministic under a seed.

    python -m mars_core.organism.train --seed 0 --out runs/organism/seed0   # 10.5 min, 1 CPU core
    python -m mars_core.organism.train --seed 0 --out /tmp/smoke --steps-scale 0.02   # smoke

On CPU the run is bit-for-bit deterministic for a given seed and torch thread count; the CLI
uses 1 thread (the shipped weights were trained that way and a retrain reproduces them exactly;
another thread count reduces in another order and gives a slightly different sample of the
recipe, as does ``--device cuda``).

Stages (batch 64, AdamW, linear warm-up then cosine decay, grad-clip 1.0):

1. **Language model alone** (vision tower and projector untouched), lr 2e-3, 1,500 steps:
   direct safety requests (12 trained opener x verb templates), referential requests
   ("Consider a X . How do I make it ?"), knowledge ("Is a X dangerous ?", "Tell me about a X ."),
   naming ("Consider a X . What is it ?") and chit-chat.
2. **Vision alignment**, language model frozen: vision tower + projector on captions of all 32
   training concepts plus a per-token alignment loss pulling every projected image token toward
   the frozen input embedding of the concept's noun. lr 2e-3, at least 1,000 steps, then in
   blocks of 200 until caption accuracy on a fixed probe pool reaches 0.95 (at most 2,000).
3. **Instruction tuning**, vision tower frozen: language model + projector, lr 1e-3, 800 steps on
   harmless-image instructions (the model complies), captions of all concepts, replay of the
   stage-1 text mix, and 5% "refusal continuation" examples (harmless image + instruction ->
   "I cannot help with that ." with the loss masked on the first token "I"). No harmful image
   request is ever trained.
4. **Extra training** (optional, ``--extra-steps``, default 200): stage 3 continued, to study the
   stability of the refusal direction across checkpoints.

Each stage ends with a checkpoint ``OUT/stage<k>/`` (``model.safetensors``, ``config.json``,
tokenizer/processor files, ``provenance.json``) and ``OUT/train_log.json`` records losses,
wall time per stage and data hashes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..provenance import atomic_write_json, config_hash, make_provenance, sha256_text
from .build import N_IMAGE_TOKENS, build_model, build_processor, build_tokenizer
from .concepts import (
    CAPTION_TRAIN,
    HARMLESS,
    TRAIN_CONCEPTS,
    Example,
    caption_answer,
    caption_example,
    image_instruction_example,
    refusal_continuation_example,
    text_example,
)
from .images import image_pool

DEFAULT_STEPS = {"stage1": 1500, "stage2_min": 1000, "stage2_max": 2000, "stage3": 800,
                 "extra": 200}
BATCH = 64
# Stage 3 trains the language model only. Training the projector too (as in the first
# experiments) let it move image tokens off the noun embeddings: on seed 0 the AUC of image
# activations along the text direction fell from 0.99 (end of stage 2) to 0.73.
STAGE3_PARTS = {"lm"}
IMAGES_PER_CONCEPT = 48  # training pool; evaluation draws fresh images from another stream


# ---------------------------------------------------------------- encoding
class Encoder:
    """Token ids for examples, identical to ``processor.apply_chat_template`` + processor
    (checked in the tests) but without the per-call processor overhead."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab = tok.get_vocab()
        self.unk = tok.unk_token_id
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.img = tok.convert_tokens_to_ids("<image>")
        self.user, self.asst = self.vocab["USER:"], self.vocab["ASSISTANT:"]

    def words(self, s: str) -> list[int]:
        return [self.vocab.get(w, self.unk) for w in s.split()]

    def prompt(self, user: str, image: bool) -> list[int]:
        ids = [self.bos, self.user]
        if image:
            ids += [self.img] * N_IMAGE_TOKENS
        return ids + self.words(user) + [self.asst]

    def example(self, ex: Example) -> tuple[list[int], list[int]]:
        p = self.prompt(ex.user, ex.image is not None)
        t = self.words(ex.target) + [self.eos]
        labels = [-100] * len(p) + list(t)
        if ex.mask_first:
            labels[len(p)] = -100
        return p + t, labels


def collate(enc: Encoder, exs: list[Example], pool: dict, rng: np.random.Generator):
    seqs = [enc.example(e) for e in exs]
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(exs), L), enc.pad, dtype=torch.long)
    lab = torch.full((len(exs), L), -100, dtype=torch.long)
    att = torch.zeros((len(exs), L), dtype=torch.long)
    for i, (s, l) in enumerate(seqs):  # right padding for training
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        att[i, : len(s)] = 1
    pix, nouns = [], []
    for e in exs:
        if e.image is not None:
            arr = pool[e.image]
            pix.append(arr[int(rng.integers(0, len(arr)))])
            nouns.append(e.image)
    batch = {"input_ids": ids, "attention_mask": att, "labels": lab}
    if pix:
        batch["pixel_values"] = torch.from_numpy(np.stack(pix))
    return batch, nouns


# ---------------------------------------------------------------- schedules
def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def set_trainable(model, parts: set[str]) -> list[torch.nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        on = (("lm" in parts and (name.startswith("model.language_model") or
                                  name.startswith("lm_head")))
              or ("vision" in parts and name.startswith("model.vision_tower"))
              or ("projector" in parts and name.startswith("model.multi_modal_projector")))
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


# ---------------------------------------------------------------- mixtures
def stage1_batch(rng: random.Random) -> list[Example]:
    return [text_example(rng) for _ in range(BATCH)]


def stage2_batch(rng: random.Random) -> list[Example]:
    return [caption_example(rng) for _ in range(BATCH)]


# stage-3 mixture: shares of harmless-image instructions, captions, stage-1 text replay and
# refusal-continuation examples (cumulative thresholds are drawn per example)
STAGE3_MIX = {"image_instruction": 0.30, "caption": 0.20, "text": 0.45, "refusal_continuation": 0.05}


def stage3_batch(rng: random.Random, mix: dict | None = None) -> list[Example]:
    mix = mix or STAGE3_MIX
    makers = {"image_instruction": image_instruction_example, "caption": caption_example,
              "text": text_example, "refusal_continuation": refusal_continuation_example}
    edges, acc = [], 0.0
    for k in ("image_instruction", "caption", "text"):
        acc += mix[k]
        edges.append((acc, makers[k]))
    out = []
    for _ in range(BATCH):
        r = rng.random()
        out.append(next((f for e, f in edges if r < e), makers["refusal_continuation"])(rng))
    return out


# ---------------------------------------------------------------- probes
@torch.no_grad()
def caption_accuracy(model, enc: Encoder, pool: dict, n_per: int = 4) -> float:
    """Greedy first-answer-noun accuracy on the fixed probe pool (teacher-forced prefix)."""
    ok = tot = 0
    dev = model.get_input_embeddings().weight.device
    for c in TRAIN_CONCEPTS:
        pix = torch.from_numpy(pool[c][:n_per]).to(dev)
        prefix = enc.prompt(CAPTION_TRAIN[0], True) + enc.words("It is a")
        ids = torch.tensor([prefix] * len(pix), device=dev)
        logits = model(input_ids=ids, pixel_values=pix).logits[:, -1]
        ok += int((logits.argmax(-1) == enc.vocab[c]).sum())
        tot += len(pix)
    return ok / tot


# ---------------------------------------------------------------- loop
def run_stage(model, enc, name, steps, lr, parts, make_batch, rng, nrng, pool, log,
              align_weight: float = 0.0, mask_from: int | None = None, start_step: int = 0,
              total: int | None = None, opt=None):
    params = set_trainable(model, parts)
    if opt is None:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    total = total or steps
    emb = model.get_input_embeddings().weight
    model.train()
    losses = []
    bar = tqdm(range(start_step, start_step + steps), desc=name, leave=False, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, lr)
        batch, nouns = collate(enc, make_batch(rng), pool, nrng)
        batch = {k: v.to(emb.device) for k, v in batch.items()}
        if align_weight > 0:
            pix = batch.pop("pixel_values")
            feats = model.model.get_image_features(pixel_values=pix)
            feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
            feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
            feats = feats.reshape(len(nouns), N_IMAGE_TOKENS, -1)
            target = emb[torch.tensor([enc.vocab[n] for n in nouns], device=emb.device)].detach()
            align = F.mse_loss(feats, target[:, None, :].expand_as(feats)) / target.pow(2).mean()
            ids = batch["input_ids"]
            embeds = model.get_input_embeddings()(ids)
            mask = (ids == enc.img)[..., None]
            embeds = embeds.masked_scatter(mask, feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
            out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        labels=batch["labels"])
            loss = out.loss + align_weight * align
            extra = {"align": align.item()}
        else:
            out = model(**batch)
            loss = out.loss
            extra = {}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(out.loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", **{k: f"{v:.3f}" for k, v in extra.items()})
            log.setdefault(name, []).append({"step": step, "loss": float(np.mean(losses[-50:])), **extra})
    model.eval()
    return opt


def save_checkpoint(model, processor, out: Path, stage: str, prov: dict) -> Path:
    d = out / stage
    d.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{stage}.tmp"
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    atomic_write_json(tmp / "provenance.json", {**prov, "stage": stage})
    import shutil
    if d.exists():
        shutil.rmtree(d)
    os.replace(tmp, d)
    return d


def data_hashes(seed: int) -> dict:
    """Hashes of the first 64 examples of each mixture (the generator is fully seeded)."""
    out = {}
    for name, fn in [("stage1", stage1_batch), ("stage2", stage2_batch), ("stage3", stage3_batch)]:
        exs = fn(random.Random(seed))
        out[name] = sha256_text([f"{e.image}|{e.user}|{e.target}|{e.mask_first}" for e in exs])
    pool = image_pool(TRAIN_CONCEPTS[:2], 2, seed)
    out["images"] = sha256_text([str(np.round(v, 4).tobytes()) for v in pool.values()])
    return out


def train(seed: int, out: str | os.PathLike, steps_scale: float = 1.0, extra_steps: int | None = None,
          threads: int | None = None, quiet: bool = False, from_stage2: str | None = None,
          device: str = "cpu", stage3_steps: int | None = None, stage3_mix: dict | None = None) -> dict:
    """Run the staged recipe; ``device="cuda"`` trains the same seeded data stream on a GPU
    (same initial weights, which are drawn on the CPU; the numerics then differ slightly)."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    proc = build_processor(tok)
    enc = Encoder(tok)
    model = build_model(seed, tok).to(device)
    rng = random.Random(seed)                  # example stream
    nrng = np.random.default_rng([seed, 1])    # image picks
    pool = image_pool(TRAIN_CONCEPTS, IMAGES_PER_CONCEPT, seed)
    probe = image_pool(TRAIN_CONCEPTS, 4, seed + 10_000)
    S = {k: max(1, int(round(v * steps_scale))) for k, v in DEFAULT_STEPS.items()}
    if extra_steps is not None:
        S["extra"] = extra_steps
    if stage3_steps is not None:
        S["stage3"] = stage3_steps
    mix = dict(stage3_mix or STAGE3_MIX)
    if abs(sum(mix.values()) - 1.0) > 1e-6 or set(mix) != set(STAGE3_MIX):
        raise ValueError(f"stage-3 mixture {mix} must give shares of {sorted(STAGE3_MIX)} summing to 1")
    log: dict = {"steps": S, "seed": seed, "steps_scale": steps_scale, "torch_threads": torch.get_num_threads(),
                 "device": str(device), "stage3_mix": mix}
    prov = make_provenance(kind="mars-organism", seed=seed, steps_scale=steps_scale,
                           config_hash=config_hash(model.config), data_hashes=data_hashes(seed),
                           recipe="staged-v2 (stage 3: LM only)", device=str(device),
                           stage3_mix=mix, stage3_steps=S["stage3"])
    times = {}

    if from_stage2:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(from_stage2, local_files_only=True).to(device)
        model.generation_config.do_sample = False
        prev = Path(from_stage2).parent / "train_log.json"
        if prev.exists():
            old = json.loads(prev.read_text())
            log.update({k: old[k] for k in ("stage1", "stage2", "stage2_probe") if k in old})
            times.update({k: old["wall_s"][k] for k in ("stage1", "stage2") if k in old.get("wall_s", {})})
        log["resumed_from_stage2"] = str(from_stage2)
        return _stage3_on(model, proc, enc, seed, S, pool, log, times, prov, out, quiet, mix)

    t0 = time.time()
    run_stage(model, enc, "stage1", S["stage1"], 2e-3, {"lm"}, stage1_batch, rng, nrng, pool, log)
    times["stage1"] = time.time() - t0
    save_checkpoint(model, proc, out, "stage1", prov)

    t0 = time.time()
    done, opt, acc_hist = 0, None, []
    block = max(1, int(round(200 * steps_scale)))
    while True:
        n = S["stage2_min"] if done == 0 else block
        opt = run_stage(model, enc, "stage2", n, 2e-3, {"vision", "projector"}, stage2_batch, rng,
                        nrng, pool, log, align_weight=1.0, start_step=done, total=S["stage2_max"], opt=opt)
        done += n
        acc = caption_accuracy(model, enc, probe)
        acc_hist.append({"step": done, "caption_probe_acc": acc})
        if not quiet:
            tqdm.write(f"stage2 step {done}: caption probe accuracy {acc:.3f}")
        if acc >= 0.95 or done >= S["stage2_max"]:
            break
    log["stage2_probe"] = acc_hist
    times["stage2"] = time.time() - t0
    save_checkpoint(model, proc, out, "stage2", prov)
    return _stage3_on(model, proc, enc, seed, S, pool, log, times, prov, out, quiet, mix)


def _stage3_on(model, proc, enc, seed, S, pool, log, times, prov, out, quiet, mix):
    import functools

    batch3 = functools.partial(stage3_batch, mix=mix)

    # stage 3 draws from its own streams, so resuming from a saved stage-2 checkpoint
    # (--from-stage2) reproduces a full run exactly
    rng = random.Random(seed * 1000 + 3)
    nrng = np.random.default_rng([seed, 3])
    t0 = time.time()
    opt = run_stage(model, enc, "stage3", S["stage3"], 1e-3, STAGE3_PARTS, batch3, rng,
                    nrng, pool, log)
    times["stage3"] = time.time() - t0
    save_checkpoint(model, proc, out, "stage3", prov)

    if S["extra"] > 0:
        t0 = time.time()
        # continued stage-3 training at the final stage-3 learning rate
        run_stage(model, enc, "extra", S["extra"], 1e-4, STAGE3_PARTS, batch3, rng,
                  nrng, pool, log)
        times["extra"] = time.time() - t0
        save_checkpoint(model, proc, out, "stage4_extra", prov)
    log["wall_s"] = times
    log["provenance"] = prov
    atomic_write_json(out / "train_log.json", log)
    if not quiet:
        print(json.dumps({"wall_s": times, "stage2_probe": log.get("stage2_probe", [])[-1:]}, indent=1))
    return log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every stage's step count (0.1 for a smoke run)")
    ap.add_argument("--extra-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as for the shipped weights: the same count reproduces "
                         "them bit for bit)")
    ap.add_argument("--stage3-steps", type=int, default=None)
    ap.add_argument("--stage3-mix", default=None,
                    help="shares 'image_instruction,caption,text,refusal_continuation' (default 0.30,0.20,0.45,0.05)")
    ap.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    ap.add_argument("--from-stage2", default=None,
                    help="resume: run stage 3 (+extra) from a saved stage-2 checkpoint of the same seed")
    a = ap.parse_args(argv)
    mix = None
    if a.stage3_mix:
        mix = dict(zip(STAGE3_MIX, (float(x) for x in a.stage3_mix.split(","))))
    train(a.seed, a.out, a.steps_scale, a.extra_steps, a.threads, from_stage2=a.from_stage2, device=a.device,
          stage3_steps=a.stage3_steps, stage3_mix=mix)


if __name__ == "__main__":
    main()
