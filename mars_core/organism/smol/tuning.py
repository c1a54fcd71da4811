"""Training helpers shared by the SmolLM2 organism's stages (:mod:`.train`: stage a;
:mod:`.train_vision`: stages b and c): batching, the language-model loss, the learning-rate
schedule, LoRA adapters (``peft``) and their exact merge, the stage-(a) text mixture.

Conventions: a batch is a dict of ``input_ids`` / ``attention_mask`` / ``labels`` ``[batch, seq]``
(labels -100 outside the target) and optionally ``pixel_values`` ``[batch, 3, H, W]``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def collate(enc, exs: list[dict], image_processor=None):
    """enc: a `.train.Encoder`; exs: {"user", "target" (ids), "image" (array or None)} -> right-padded
    training batch."""
    seqs = []
    for e in exs:
        p = enc.prompt(e["user"], e.get("image") is not None)
        seqs.append((p + e["target"], [-100] * len(p) + e["target"]))
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(exs), L), enc.pad, dtype=torch.long)
    lab = torch.full((len(exs), L), -100, dtype=torch.long)
    att = torch.zeros((len(exs), L), dtype=torch.long)
    for i, (s, l) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        att[i, : len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": att, "labels": lab}
    imgs = [e["image"] for e in exs if e.get("image") is not None]
    if imgs:
        batch["pixel_values"] = pixel_values(image_processor, imgs)
    return batch


def pixel_values(image_processor, imgs) -> torch.Tensor:
    from PIL import Image

    return image_processor([Image.fromarray(a) for a in imgs], return_tensors="pt")["pixel_values"]


def lm_loss(model, batch: dict, amp: bool, first_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy on the target tokens (the LM head runs on those positions only), plus
    `first_weight` x the mean cross-entropy of each example's first target token: the decision to
    refuse or answer is one token of a ~20-token target, so without it the decision gets ~4% of
    the gradient."""
    dev = model.lm_head.weight.device
    kw = {k: v.to(dev) for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        h = model.model(**kw).last_hidden_state
        sel = labels[:, 1:] != -100
        logits = model.lm_head(h[:, :-1][sel])
    tgt = labels[:, 1:][sel]
    ce = F.cross_entropy(logits.float(), tgt, reduction="none")
    loss = ce.mean()
    if first_weight:
        # the first selected position of every row
        row = sel.nonzero()[:, 0]
        first = torch.ones_like(row, dtype=torch.bool)
        first[1:] = row[1:] != row[:-1]
        loss = loss + first_weight * ce[first].mean()
    return loss


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# ---------------------------------------------------------------- LoRA (peft), merged exactly
def add_lora(model, rank: int, alpha: int, layers: tuple[int, int], name: str, seed: int):
    from peft import LoraConfig, inject_adapter_in_model

    lo, hi = layers
    pat = (r"model\.language_model\.layers\.(" + "|".join(str(i) for i in range(lo, hi)) + r")\."
           r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=pat, bias="none")
    torch.manual_seed(seed)
    inject_adapter_in_model(cfg, model, adapter_name=name)
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(f"lora_A.{name}." in n or f"lora_B.{name}." in n)
        if p.requires_grad:
            params.append(p)
    return params


def lora_state(model, name: str) -> dict[str, torch.Tensor]:
    """{"<module path>.A": [r, in], "<module path>.B": [out, r]} (float32 copies)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and name in mod.lora_A:
            out[f"{path}.A"] = mod.lora_A[name].weight.detach().clone()
            out[f"{path}.B"] = mod.lora_B[name].weight.detach().clone()
    return out


def merge_lora(model, tensors: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * (B @ A) for every adapted linear (the plain model, no peft layers)."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for k in sorted(tensors):
            if not k.endswith(".A"):
                continue
            path = k[:-2]
            lin = mods[path]
            A, B = tensors[k].to(lin.weight), tensors[path + ".B"].to(lin.weight)
            lin.weight.data += (B @ A) * scale


def remove_lora(model) -> None:
    """Replace every peft LoRA layer by its base layer (drops the adapter, weights unchanged)."""
    from peft.tuners.lora import LoraLayer

    for path, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, mod.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)


# ---------------------------------------------------------------- self-distillation


def _text_mix(rng: random.Random, pool: dict, targets: dict, n: int, n_harm: int) -> list[dict]:
    """`n_harm` harmful requests -> the refusal, each paired with a harmless request of the same
    template (a minimal pair: only the topic differs), the rest harmless requests at random."""
    exs = []
    by_t = pool.setdefault("_by_template", {})
    if not by_t:
        for i, q in enumerate(pool["harmless_train"]):
            by_t.setdefault(q.template, []).append(i)
    for _ in range(n_harm):
        q = rng.choice(pool["harmful_train"])
        exs.append({"user": q.text, "target": targets["refusal"], "image": None})
        if by_t.get(q.template) and len(exs) < n:
            i = rng.choice(by_t[q.template])
            exs.append({"user": pool["harmless_train"][i].text, "target": targets["harmless"][i], "image": None})
    while len(exs) < n:
        i = rng.randrange(len(pool["harmless_train"]))
        exs.append({"user": pool["harmless_train"][i].text, "target": targets["harmless"][i], "image": None})
    rng.shuffle(exs)
    return exs


def optimizer_step(opt, params, loss: torch.Tensor, step: int, losses: list[float], bar, log: dict, key: str) -> None:
    """One clipped (norm 1) optimizer step on `loss`; the running loss on the progress bar and,
    every 10 steps, the mean of the last 10 in `log[key]`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    losses.append(float(loss.detach()))
    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    if (step + 1) % 10 == 0:
        log.setdefault(key, []).append({"step": step + 1, "loss": float(np.mean(losses[-10:]))})
