"""Stages (b) vision alignment and (c) visual instruction tuning of the SmolLM2 organism.

See :mod:`.train` for the recipe; this module holds the image-side loops.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as D
from .build import N_IMAGE_TOKENS
from .images import render_image
from .tuning import _text_mix, add_lora, optimizer_step, collate, lm_loss, lora_state, lr_at, merge_lora, pixel_values, remove_lora

FILLER = "\n"  # the embedding the free image-token slots are pulled toward


def slot_targets(tok, phrases: list[str], emb: torch.Tensor) -> torch.Tensor:
    """[n, N_IMAGE_TOKENS, d]: the input embeddings of " " + phrase, right-aligned, free slots = FILLER."""
    fill = tok(FILLER, add_special_tokens=False)["input_ids"][0]
    rows = []
    for p in phrases:
        ids = tok(" " + p, add_special_tokens=False)["input_ids"][-N_IMAGE_TOKENS:]
        rows.append([fill] * (N_IMAGE_TOKENS - len(ids)) + ids)
    return emb[torch.tensor(rows)].detach().clone()


def slot_ids(tok, phrases: list[str]) -> torch.Tensor:
    """[n, N_IMAGE_TOKENS] token ids of the slot targets (see slot_targets)."""
    fill = tok(FILLER, add_special_tokens=False)["input_ids"][0]
    rows = []
    for p in phrases:
        ids = tok(" " + p, add_special_tokens=False)["input_ids"][-N_IMAGE_TOKENS:]
        rows.append([fill] * (N_IMAGE_TOKENS - len(ids)) + ids)
    return torch.tensor(rows)


def slot_loss(f: torch.Tensor, rows_ids: torch.Tensor, vocab: torch.Tensor, emb: torch.Tensor, scale: float,
              temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised MSE to the slot embeddings, cross-entropy of the slot token among the reading
    vocabulary with cosine logits / temp): the CE makes each image token decode to its token."""
    tgt = emb[rows_ids]
    mse = F.mse_loss(f, tgt) / scale
    ev = emb[vocab]
    logits = F.normalize(f, dim=-1) @ F.normalize(ev, dim=-1).T / temp  # [b, slots, |vocab|]
    lookup = torch.full((int(emb.shape[0]),), -100, dtype=torch.long, device=f.device)
    lookup[vocab] = torch.arange(len(vocab), device=f.device)
    ce = F.cross_entropy(logits.reshape(-1, len(vocab)), lookup[rows_ids].reshape(-1))
    return mse, ce


def render_pool(phrases: list[str], per: int, seed: int, image_processor, quiet: bool) -> tuple[torch.Tensor, list[int]]:
    """`per` training-renderer samples of every phrase: (pixel_values [n, 3, H, W], phrase index per row)."""
    rng = np.random.default_rng([seed, 2, 1])
    imgs, idx = [], []
    for k in tqdm(range(per), desc="render stage-b pool", leave=False, disable=quiet):
        for i, p in enumerate(phrases):
            imgs.append(render_image(p, rng))
            idx.append(i)
    pix = []
    for s in range(0, len(imgs), 256):
        pix.append(pixel_values(image_processor, imgs[s:s + 256]))
    return torch.cat(pix), idx


def image_features(model, pix: torch.Tensor) -> torch.Tensor:
    out = model.model.get_image_features(pixel_values=pix)
    feats = out.pooler_output
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def vision_params(model) -> list[torch.nn.Parameter]:
    ps = []
    for n, p in model.named_parameters():
        on = n.startswith("model.vision_tower") or n.startswith("model.multi_modal_projector")
        p.requires_grad_(on)
        if on:
            ps.append(p)
    return ps


def stage_b(model, enc, proc, R, seed, log, device, amp, quiet) -> dict:
    tok = enc.tok
    phrases = D.stage_b_phrases()
    emb = model.model.language_model.embed_tokens.weight.detach()
    sid = slot_ids(tok, phrases).to(device)
    vocab = torch.unique(sid)
    tgt = emb[sid]
    scale = float(tgt.pow(2).mean())
    temp, ce_w = R.get("temp", 0.05), R.get("ce_weight", 1.0)
    per = max(2, int(R.get("renders", 24)))
    pix, idx = render_pool(phrases, per, seed, proc.image_processor, quiet)
    idx_t = torch.tensor(idx)
    params = vision_params(model)
    opt = torch.optim.AdamW(params, lr=R["align_lr"], betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed * 1000 + 2)
    model.train()
    # b1: alignment only (no LM forward)
    bar = tqdm(range(R["align_steps"]), desc="stage b1 (align)", leave=False, disable=quiet, mininterval=5)
    hist = []
    for step in bar:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, R["align_steps"], R["align_lr"], R["warmup"])
        rows = torch.randint(0, len(idx), (R["align_batch"],), generator=g)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            f = image_features(model, pix[rows].to(device))
        mse, ce = slot_loss(f.float(), sid[idx_t[rows].to(device)], vocab, emb, scale, temp)
        loss = mse + ce_w * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append((float(mse.detach()), float(ce.detach())))
        if (step + 1) % 50 == 0:
            m = np.mean(hist[-50:], 0)
            bar.set_postfix(mse=f"{m[0]:.3f}", ce=f"{m[1]:.3f}")
            log.setdefault("stage_b_align", []).append({"step": step + 1, "mse": float(m[0]), "ce": float(m[1])})
    # b2: reading through the frozen LM (+ alignment)
    rng = random.Random(seed * 1000 + 3)
    nrng = np.random.default_rng([seed, 2, 2])
    opt2 = torch.optim.AdamW(params, lr=R["read_lr"], betas=(0.9, 0.98), weight_decay=0.01)
    caption_t = {p: enc.target(D.caption_target(p)) for p in phrases}
    bar = tqdm(range(R["read_steps"] if R["read_steps"] > 0 else 0), desc="stage b2 (read)", leave=False, disable=quiet, mininterval=5)
    for step in bar:
        for gr in opt2.param_groups:
            gr["lr"] = lr_at(step, R["read_steps"], R["read_lr"], 5)
        ps = [rng.choice(phrases) for _ in range(R["read_batch"])]
        exs = [{"user": rng.choice(D.CAPTION_TEMPLATES_TRAIN), "target": caption_t[p],
                "image": render_image(p, nrng)} for p in ps]
        batch = collate(enc, exs, proc.image_processor)
        loss = lm_loss(model, batch, amp)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            f = image_features(model, batch["pixel_values"].to(device))
        mse, ce = slot_loss(f.float(), sid[torch.tensor([phrases.index(p) for p in ps], device=device)], vocab, emb,
                            scale, temp)
        align = mse + ce_w * ce
        tot = loss + align
        opt2.zero_grad(set_to_none=True)
        tot.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt2.step()
        bar.set_postfix(read=f"{loss.item():.3f}", align=f"{align.item():.3f}")
        if (step + 1) % 5 == 0:
            log.setdefault("stage_b_read", []).append({"step": step + 1, "read": loss.item(), "align": align.item()})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out = {f"vision.{k}": v.detach().clone() for k, v in model.model.vision_tower.state_dict().items()}
    out.update({f"projector.{k}": v.detach().clone() for k, v in model.model.multi_modal_projector.state_dict().items()})
    return out


def stage_c(model, enc, proc, pool, targets, c_pool, tg_c, R, seed, log, device, amp, quiet) -> dict:
    params = add_lora(model, R["rank"], R["alpha"], R["layers"], "c", seed * 100 + 3)
    opt = torch.optim.AdamW(params, lr=R["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    rng = random.Random(seed * 1000 + 4)
    nrng = np.random.default_rng([seed, 3, 1])
    mix = R["mix"]
    n_img = int(round(R["batch"] * mix["image"]))
    n_cap = int(round(R["batch"] * mix["caption"]))
    n_txt = R["batch"] - n_img - n_cap
    cap_topics = D.HARMLESS_TRAIN
    model.train()
    bar = tqdm(range(R["steps"]), desc="stage c (visual instruction LoRA)", leave=False, disable=quiet, mininterval=5)
    losses = []
    for step in bar:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, R["steps"], R["lr"], R["warmup"])
        exs = []
        for _ in range(n_img):
            i = rng.randrange(len(c_pool))
            exs.append({"user": c_pool[i].text, "target": tg_c[i], "image": render_image(c_pool[i].topic, nrng)})
        for _ in range(n_cap):
            p = rng.choice(cap_topics)
            exs.append({"user": rng.choice(D.CAPTION_TEMPLATES_TRAIN), "target": enc.target(D.caption_target(p)),
                        "image": render_image(p, nrng)})
        n_harm = int(round(n_txt * R.get("text_harmful_share", 0.25)))
        exs += _text_mix(rng, pool, targets, n_txt, n_harm)
        rng.shuffle(exs)
        batch = collate(enc, exs, proc.image_processor)
        loss = lm_loss(model, batch, amp, R.get("first_weight", 0.0))
        optimizer_step(opt, params, loss, step, losses, bar, log, "stage_c_loss")
    model.eval()
    tensors = lora_state(model, "c")
    remove_lora(model)
    merge_lora(model, tensors, R["alpha"] / R["rank"])
    return {f"lora_c.{k}": v for k, v in tensors.items()}


@torch.no_grad()
def slot_accuracy(model, tok, image_processor, phrases: list[str], seed: int, heldout: bool, n: int = 1) -> float:
    """Share of rendered phrases whose 16 projected image tokens decode (nearest input embedding by
    cosine) exactly to the alignment target's token ids: a reading check without the LM."""
    emb = model.model.language_model.embed_tokens.weight
    en = emb / emb.norm(dim=-1, keepdim=True)
    fill = tok(FILLER, add_special_tokens=False)["input_ids"][0]
    rng = np.random.default_rng([seed, 77, int(heldout)])
    ok = tot = 0
    for s in range(0, len(phrases), 64):
        ps = phrases[s:s + 64] * n
        imgs = [render_image(p, rng, heldout=heldout) for p in ps]
        f = image_features(model, pixel_values(image_processor, imgs).to(emb.device))
        ids = (f / f.norm(dim=-1, keepdim=True) @ en.T).argmax(-1)
        for p, row in zip(ps, ids.tolist()):
            t = tok(" " + p, add_special_tokens=False)["input_ids"][-N_IMAGE_TOKENS:]
            ok += row == [fill] * (N_IMAGE_TOKENS - len(t)) + t
            tot += 1
    return ok / tot
