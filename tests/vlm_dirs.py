"""Tiny random-init vision-language model directories as users have them on disk (``save_pretrained`` of the
model, a tokenizer built in code with Qwen's special tokens and chat template, the image processor's
``preprocessor_config.json``), for ``model.lm_path``. No download."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (  # Qwen2-VL's layout: images as <|vision_start|><|image_pad|><|vision_end|>
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH, MERGE = 8, 2
# a 32 x 32 input image: a 4 x 4 patch grid -> 2 x 2 merged -> 4 <|image_pad|> tokens
MIN_PIXELS, MAX_PIXELS = 16 * 16, 64 * 64


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    words = ("what colour is the shape red green blue yellow circle square answer image describe a b c d "
             "0 1 2 3 4 5 6 7 8 9 options which object").split()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(words)] * 4, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=QWEN_SPECIAL[1:], chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def _ids(tok) -> dict[str, int]:
    get = tok.convert_tokens_to_ids
    return {"image_token_id": get("<|image_pad|>"), "video_token_id": get("<|video_pad|>"),
            "vision_start_token_id": get("<|vision_start|>"), "vision_end_token_id": get("<|vision_end|>")}


TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=1024, tie_word_embeddings=False)


def save_qwen25_vl(root: Path, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL directory (Qwen2_5_VLForConditionalGeneration + tokenizer + image processor)."""
    tok = qwen_tokenizer()
    return _save(root, tok, qwen25_vl_config(tok), Qwen2_5_VLForConditionalGeneration, seed)


def qwen25_vl_config(tok) -> Qwen2_5_VLConfig:
    """The tiny Qwen2.5-VL's config for tokenizer ``tok``."""
    return Qwen2_5_VLConfig(
        text_config=dict(**TEXT, vocab_size=len(tok),
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=32,
                           fullatt_block_indexes=[1]),
        **_ids(tok))


def save_qwen3_vl(root: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-VL directory (deepstack features into the first text layers)."""
    tok = qwen_tokenizer()
    cfg = Qwen3VLConfig(
        text_config=dict(**{k: v for k, v in TEXT.items() if k != "tie_word_embeddings"}, vocab_size=len(tok),
                         head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                       "mrope_interleaved": True, "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        tie_word_embeddings=False, **_ids(tok))
    return _save(root, tok, cfg, Qwen3VLForConditionalGeneration, seed)


def image_processor() -> Qwen2VLImageProcessorPil:
    """The tiny VLM's image processor (its ``preprocessor_config.json``)."""
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE)


def _save(root: Path, tok, cfg, cls, seed: int) -> Path:
    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    image_processor().save_pretrained(root)
    return root
