"""Tokenizer, processor, chat template and model config of the organism.

A real ``transformers`` architecture (``LlavaForConditionalGeneration``: CLIP vision tower,
2-layer MLP projector, Llama decoder) so the package's generic adapter serves the organism and
hub models through the same code path.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .concepts import vocabulary
from .images import CLIP_MEAN, CLIP_STD, SIZE

PATCH = 8
N_IMAGE_TOKENS = (SIZE // PATCH) ** 2  # CLS dropped ("default" feature strategy)

# LLaVA-style template. Content is a string or a list of {"type": "image"} / {"type": "text"}
# parts; images are placed where their part is. Words are space separated (word-level vocab).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ ' USER:' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ASSISTANT:' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ ' <image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ ' ' + part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        padding_side="left", model_max_length=256,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tok: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    tok = tok or build_tokenizer()
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
        do_center_crop=True, do_resize=True, do_rescale=True, do_normalize=True,
        image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist(), do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=PATCH,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        image_token="<image>", num_additional_image_tokens=1,
    )


def build_config(tok: PreTrainedTokenizerFast | None = None) -> LlavaConfig:
    tok = tok or build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=SIZE, patch_size=PATCH, num_channels=3, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=N_IMAGE_TOKENS, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = tok.pad_token_id
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    return cfg


def build_model(seed: int, tok: PreTrainedTokenizerFast | None = None
                ) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tok))
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = (
        model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id)
    gc.do_sample = False
    gc.max_new_tokens = 12
    return model.eval()
