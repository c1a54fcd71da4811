"""The SmolLM2 organism's architecture: LLaVA with SmolLM2-135M-Instruct as its language model.

``LlavaForConditionalGeneration`` with SmolLM2's own ``LlamaConfig`` as text config (30 layers,
d_model 576, tied embeddings), a small CLIP vision tower trained from scratch (128x128 images,
32-pixel patches: 16 image tokens after the CLS token is dropped, hidden 192, 4 layers) and
LLaVA's 2-layer GELU projector (192 -> 576 -> 576). One token is added to SmolLM2's vocabulary:
``<image>`` (id 49152; its embedding row is the mean input embedding, never used as input since
the image features replace it, and suppressed in generation).

Why LLaVA and not Idefics3 / SmolVLM (whose language model is also SmolLM2): LLaVA is the
simplest real MLLM class that takes a Llama text config unchanged, its processor expands
``<image>`` into a fixed number of tokens (16 here) without Idefics3's image splitting and
pixel shuffle, and the package already serves it (family ``llava``, decoder layers at
``model.language_model.layers``), so the organism goes through the same code path as hub
LLaVA models.

The chat template is SmolLM2's ChatML template (with its default system prompt) plus image
parts: an image part renders as ``<image>\\n`` inside the user turn.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from .images import SIZE

PATCH = 32
N_IMAGE_TOKENS = (SIZE // PATCH) ** 2  # 16
IMAGE_TOKEN = "<image>"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_tokenizer(base_tok):
    """SmolLM2's tokenizer plus the ``<image>`` special token, left padding, the MLLM template."""
    import copy

    tok = copy.deepcopy(base_tok)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tok) -> LlavaProcessor:
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, do_center_crop=True,
        do_resize=True, do_rescale=True, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def build_config(base_config, tok) -> LlavaConfig:
    d = base_config.to_dict()
    for k in ("architectures", "_name_or_path", "transformers_version", "dtype", "quantization_config"):
        d.pop(k, None)
    d["vocab_size"] = len(tok)
    text = LlamaConfig(**d)
    vision = CLIPVisionConfig(**VISION, image_size=SIZE, patch_size=PATCH, num_channels=3, projection_dim=VISION["hidden_size"])
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      image_seq_length=N_IMAGE_TOKENS, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=True)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, k, getattr(base_config, k))
    return cfg


def _set_generation(model, tok) -> None:
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gc.do_sample = False
    gc.max_new_tokens = 32
    gc.suppress_tokens = [tok.convert_tokens_to_ids(IMAGE_TOKEN)]
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)


def build_model(seed: int, base_model, tok, *, meta: bool = False) -> LlavaForConditionalGeneration:
    """The untrained organism: SmolLM2's weights in the language model (one added embedding row),
    a vision tower and projector initialised from ``seed``. ``meta=True`` builds it on the meta
    device (for loading a full state dict with ``assign=True``)."""
    cfg = build_config(base_model.config, tok)
    if meta:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(cfg)
    else:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
        sd = dict(base_model.model.state_dict())
        emb = sd["embed_tokens.weight"]
        extra = len(tok) - emb.shape[0]
        if extra:
            sd["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
        missing, unexpected = model.model.language_model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if "rotary" not in m]
        if missing or unexpected:
            raise RuntimeError(f"SmolLM2 weights do not fit the organism: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
    _set_generation(model, tok)
    return model.eval()
