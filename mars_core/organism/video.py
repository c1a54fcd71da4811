"""A video-capable organism: the shipped LLaVA organism transplanted into Video-LLaVA.

``build_video_organism()`` (also ``load_organism("video")``) builds a transformers
``VideoLlavaForConditionalGeneration`` from the shipped ``natural`` weights, with no training:

* ``image_tower`` and ``video_tower`` are both copies of the organism's CLIP vision tower,
  ``multi_modal_projector`` and ``language_model`` / ``lm_head`` are the organism's own;
* the word-level tokenizer gets one new special token ``<video>`` (id 121, appended, so every
  existing id is unchanged); its input-embedding row is zero and never read (the processor
  expands ``<video>`` into placeholders that the model overwrites with projected frame
  features), its ``lm_head`` row is zero and the token is in ``generation_config.suppress_tokens``;
* the chat template renders ``{"type": "video"}`` parts as `` <video>`` exactly where it renders
  images as `` <image>``; the processor is ``VideoLlavaProcessor`` with the organism's own image
  processor and a ``VideoLlavaVideoProcessor`` with the same resize / crop / CLIP normalisation.

How Video-LLaVA embeds media (transformers 5): an image drops its CLS token
(``vision_feature_select_strategy="default"``), so an image prompt is token-for-token the
organism's (16 image tokens) and gives the same logits. A video's frames go through the video
tower *with* their CLS token (the strategy is ignored for videos) and are concatenated: a
4-frame clip is 4 x (16 + 1) = 68 ``<video>`` tokens, one CLS feature per frame that the
language model never saw in training. The organism's context is 128 positions, so at most
``MAX_FRAMES`` frames fit with a short request and 8 generated tokens.

Its behaviour is measured by the package's pipeline like any model's: ``mars reproduce --model
organism:video`` (the organism's suite plus fresh glyph videos, `mars_core.organism.sets`), and
the natural card's video section is written from that run (`analysis.cards`).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .build import CHAT_TEMPLATE, N_IMAGE_TOKENS, PATCH
from .images import SIZE

VIDEO_TOKEN = "<video>"
N_FRAMES = 4
#: ``<video>`` placeholders per frame: the 16 patch tokens plus the frame's CLS token.
TOKENS_PER_FRAME = N_IMAGE_TOKENS + 1
#: Frames that fit the 128-position context with BOS, role words, a 7-word request and 8 new tokens.
MAX_FRAMES = (128 - 2 - 8 - 1 - 8) // TOKENS_PER_FRAME

# The organism's template with video parts rendered like image parts.
VIDEO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- elif part['type'] == 'text' -%}",
    "{%- elif part['type'] == 'video' -%}{{ ' <video>' }}{%- elif part['type'] == 'text' -%}",
)
assert VIDEO_CHAT_TEMPLATE != CHAT_TEMPLATE


# ---------------------------------------------------------------- building
def build_video_tokenizer(base):
    """The organism's word-level tokenizer plus ``<video>``; every existing id is unchanged."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=base.bos_token, eos_token=base.eos_token,
        unk_token=base.unk_token, pad_token=base.pad_token,
        extra_special_tokens={"image_token": "<image>", "video_token": VIDEO_TOKEN},
        padding_side="left", model_max_length=base.model_max_length,
    )  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": ["<image>", VIDEO_TOKEN]})
    tok.chat_template = VIDEO_CHAT_TEMPLATE
    base_vocab = base.get_vocab()
    vocab = tok.get_vocab()
    if any(vocab.get(w) != i for w, i in base_vocab.items()) or vocab[VIDEO_TOKEN] != len(base_vocab):
        raise AssertionError("extending the organism's tokenizer changed existing token ids")
    return tok


def build_video_processor(base_processor, tok=None):
    """``VideoLlavaProcessor``: the organism's image processor and a video processor with the same
    resize, crop and CLIP normalisation (frames are processed like images)."""
    from transformers import VideoLlavaProcessor, VideoLlavaVideoProcessor

    tok = tok or build_video_tokenizer(base_processor.tokenizer)
    ip = base_processor.image_processor
    vp = VideoLlavaVideoProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
        image_mean=list(ip.image_mean), image_std=list(ip.image_std), resample=ip.resample,
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
    )  # fmt: skip
    return VideoLlavaProcessor(
        image_processor=ip, video_processor=vp, tokenizer=tok, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", video_token=VIDEO_TOKEN, chat_template=VIDEO_CHAT_TEMPLATE,
    )  # fmt: skip


def video_config(llava_config, tok):
    """``VideoLlavaConfig`` with the organism's vision and text configs (vocab + 1 for ``<video>``)."""
    from transformers import LlamaConfig, VideoLlavaConfig

    text = llava_config.text_config.to_dict()
    text.pop("model_type", None)
    text["vocab_size"] = len(tok)
    vision = llava_config.vision_config.to_dict()
    cfg = VideoLlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**text),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids(VIDEO_TOKEN),
        projector_hidden_act=llava_config.projector_hidden_act,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        vision_feature_layer=llava_config.vision_feature_layer,
        image_seq_length=N_IMAGE_TOKENS, video_seq_length=N_FRAMES * TOKENS_PER_FRAME,
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )  # fmt: skip
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(cfg, k, getattr(llava_config, k, None))
    return cfg


def transplant(llava_model, base_processor):
    """``(VideoLlavaForConditionalGeneration, VideoLlavaProcessor)`` carrying ``llava_model``'s
    weights: vision tower -> image_tower and video_tower, projector and LM unchanged."""
    from transformers import VideoLlavaForConditionalGeneration

    tok = build_video_tokenizer(base_processor.tokenizer)
    proc = build_video_processor(base_processor, tok)
    cfg = video_config(llava_model.config, tok)
    src = llava_model.state_dict()
    dst: dict[str, torch.Tensor] = {}
    for k, v in src.items():
        if k.startswith("model.vision_tower."):
            rest = k[len("model.vision_tower."):]
            dst["model.image_tower." + rest] = v.clone()
            dst["model.video_tower." + rest] = v.clone()
        else:
            dst[k] = v.clone()
    n_new = len(tok) - src["lm_head.weight"].shape[0]
    for k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        dst[k] = torch.cat([dst[k], dst[k].new_zeros(n_new, dst[k].shape[1])])
    model = VideoLlavaForConditionalGeneration(cfg)  # ~1 M parameters: random init is instant
    model.load_state_dict(dst, strict=True)
    model = model.to(src["lm_head.weight"].dtype).eval()
    gc = model.generation_config
    for k, v in llava_model.generation_config.to_diff_dict().items():
        if not k.startswith("transformers_version"):
            setattr(gc, k, v)
    gc.suppress_tokens = [tok.convert_tokens_to_ids(VIDEO_TOKEN)]
    return model, proc


def build_video_organism(variant: str = "natural", dtype=None, *, tune_steps: int = 0, tune_seed: int = 0,
                         verbose: bool = False):
    """``(VideoLlavaForConditionalGeneration, VideoLlavaProcessor)`` transplanted from the shipped
    ``variant``: no training and no extra weight files (well under a second).

    ``tune_steps > 0`` then runs :func:`tune_video_lm` on the transplant (the optional short,
    seeded fine-tune of the language model on harmless video data; about 1 minute for 200 steps
    on one CPU thread). Image prompts give the organism's exact logits only with ``tune_steps=0``.
    """
    from .load import load_shipped

    model, proc = load_shipped(variant, dtype=dtype)
    vmodel, vproc = transplant(model, proc)
    vmodel.config._name_or_path = f"mars-organism-{variant}-video-transplant"
    if tune_steps:
        vmodel.tune_log = tune_video_lm(vmodel, vproc, steps=tune_steps, seed=tune_seed, verbose=verbose)
        vmodel.config._name_or_path = f"mars-organism-{variant}-video-tuned{tune_steps}-seed{tune_seed}"
    return vmodel, vproc


# ---------------------------------------------------------------- optional fine-tune
#: Mixture of the optional fine-tune (fractions of each batch). No harmful video or image
#: request is ever trained, as in the organism's stage 3.
TUNE_MIX = (
    ("video_instruction", 0.30),     # harmless concept video + request -> "Sure . Here is how to V it ."
    ("video_caption", 0.20),         # any training concept video + caption template -> "It is a X ."
    ("video_refusal_continuation", 0.05),  # harmless video + request -> refusal, loss masked on "I"
    ("image_replay", 0.10),          # image captions / harmless image instructions
    ("text_replay", 0.35),           # the stage-1 text mix
)


def tune_video_lm(model, processor, *, steps: int = 200, seed: int = 0, lr: float = 5e-4, batch: int = 32,
                  verbose: bool = False) -> dict:
    """Fine-tune only the language model and ``lm_head`` of a transplanted video organism (both
    towers and the projector frozen) on :data:`TUNE_MIX`, in place, deterministically under
    ``seed`` (one torch thread while it runs). AdamW (betas 0.9/0.98, wd 0.01), linear warm-up
    over 30 steps then cosine to 0.1x, grad-clip 1. Training videos come from rng streams
    ``seed + 80000`` (images ``seed + 81000``), disjoint from every evaluation stream. Returns a
    log {"loss": [...], "wall_s": ...}.
    """
    import random

    import torch.nn.functional as F

    from .concepts import (
        TRAIN_CONCEPTS,
        caption_example,
        image_instruction_example,
        refusal_continuation_example,
        text_example,
    )
    from .images import draw_glyph, draw_video, to_pixels

    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        tok = processor.tokenizer
        vocab = tok.get_vocab()
        vid_id, img_id = vocab[VIDEO_TOKEN], vocab["<image>"]
        per = 16
        pool_v = {c: [to_pixels(draw_video(c, np.random.default_rng([seed + 80000, i, j]), N_FRAMES,
                                           mode="move" if j % 2 == 0 else "blink")) for j in range(per)]
                  for i, c in enumerate(TRAIN_CONCEPTS)}
        pool_i = {c: to_pixels([draw_glyph(c, np.random.default_rng([seed + 81000, i, j])) for j in range(per)])
                  for i, c in enumerate(TRAIN_CONCEPTS)}
        rng, nrng = random.Random(seed), np.random.default_rng([seed, 82000])
        cum = np.cumsum([f for _, f in TUNE_MIX])

        def sample():
            kind = TUNE_MIX[int(np.searchsorted(cum, rng.random(), side="right"))][0]
            if kind == "video_instruction":
                return image_instruction_example(rng), "video"
            if kind == "video_caption":
                return caption_example(rng), "video"
            if kind == "video_refusal_continuation":
                return refusal_continuation_example(rng), "video"
            if kind == "image_replay":
                return (caption_example(rng) if rng.random() < 0.5 else image_instruction_example(rng)), "image"
            return text_example(rng), None

        def words(x):
            return [vocab.get(w, tok.unk_token_id) for w in x.split()]

        def encode(ex, media):
            ids = [tok.bos_token_id, vocab["USER:"]]
            if media == "video":
                ids += [vid_id] * (N_FRAMES * TOKENS_PER_FRAME)
            elif media == "image":
                ids += [img_id] * N_IMAGE_TOKENS
            ids += words(ex.user) + [vocab["ASSISTANT:"]]
            tgt = words(ex.target) + [tok.eos_token_id]
            lab = [-100] * len(ids) + tgt
            if ex.mask_first:
                lab[len(ids)] = -100
            return ids + tgt, lab

        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for n, p in model.named_parameters()
                  if n.startswith("model.language_model.") or n.startswith("lm_head.")]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        model.train()
        losses = []
        for step in range(steps):
            exs = [sample() for _ in range(batch)]
            seqs = [encode(e, m if e.image is not None else None) for e, m in exs]
            L = max(len(x) for x, _ in seqs)
            ids = torch.full((batch, L), tok.pad_token_id, dtype=torch.long)
            lab = torch.full((batch, L), -100, dtype=torch.long)
            att = torch.zeros((batch, L), dtype=torch.long)
            for i, (x, y) in enumerate(seqs):  # right padding for training
                ids[i, : len(x)], lab[i, : len(y)], att[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            kw = {}
            vids = [pool_v[e.image][int(nrng.integers(per))] for e, m in exs if e.image is not None and m == "video"]
            imgs = [pool_i[e.image][int(nrng.integers(per))] for e, m in exs if e.image is not None and m == "image"]
            if vids:
                kw["pixel_values_videos"] = torch.from_numpy(np.stack(vids))
            if imgs:
                kw["pixel_values"] = torch.from_numpy(np.stack(imgs))
            cur = lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            for g in opt.param_groups:
                g["lr"] = cur
            logits = model(input_ids=ids, attention_mask=att, **kw).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if verbose and step % 25 == 0:
                print(f"tune step {step} loss {losses[-1]:.4f} {time.time() - t0:.0f}s", flush=True)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        torch.set_num_threads(threads)
    return {"loss": losses, "wall_s": time.time() - t0, "steps": steps, "seed": seed, "lr": lr, "batch": batch}
