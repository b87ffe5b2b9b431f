"""Token layout of prompts and responses, shared by rollout (sampling) and learner (SFT targets).

prompt   = <img_start> <img>*n <img_end> "\\n" question "\\n"
response = [<gen> <img_start> <img>*n <img_end>] <answer> X </answer> <eos>
The bracketed part is CLEAR's generate-then-answer: the model emits <gen>, a latent is generated, and
the latent enters the context through the bridge at the <img> slots that follow.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from policy.tokenizer import special_token_ids as special_ids


def image_slot(ids: dict[str, int], n_image_tokens: int) -> list[int]:
    """The token run of one image slot: <img_start> <img>*n <img_end>."""
    return [ids["img_start"], *([ids["img"]] * n_image_tokens), ids["img_end"]]


def encode_prompt(tok: PreTrainedTokenizerBase, text: str, n_image_tokens: int, with_image: bool = True) -> list[int]:
    """The prompt's token ids: an image slot (when there is an image), then the question text."""
    ids = special_ids(tok)
    body = tok.encode("\n" + text + "\n", add_special_tokens=False)
    return (image_slot(ids, n_image_tokens) if with_image else []) + body


def encode_target(tok: PreTrainedTokenizerBase, answer: str, n_image_tokens: int, generate: bool) -> tuple[list[int], list[bool]]:
    """A supervised response and its loss mask (False on the image slot, which is not sampled)."""
    ids = special_ids(tok)
    out: list[int] = []
    mask: list[bool] = []
    if generate:
        slot = image_slot(ids, n_image_tokens)
        out += [ids["gen"], *slot]
        mask += [True] + [False] * len(slot)
    tail = [ids["answer_start"], *tok.encode(answer, add_special_tokens=False), ids["answer_end"], ids["eos"]]
    return out + tail, mask + [True] * len(tail)


VISION_KEYS = ("vision_start", "vision_pad", "vision_end")  # a VLM's image run (policy.vision), when present


def unsampleable_ids(ids: dict[str, int]) -> list[int]:
    """Tokens the policy never samples (image-slot structure, a VLM's vision run, padding): their logits are
    -inf both in rollout and in the learner, so behaviour and recomputed log-probs describe the same
    distribution."""
    vision = {ids[k] for k in VISION_KEYS if k in ids}
    return sorted({ids["img"], ids["img_start"], ids["img_end"], ids["pad"], *vision})


def mask_unsampleable(logits, ids: dict[str, int]):
    """logits (..., V) with the unsampleable tokens set to -inf (a new tensor)."""
    return logits.index_fill(-1, logits.new_tensor(unsampleable_ids(ids), dtype=torch.long), float("-inf"))


def decode_response(tok: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """Text of the sampled tokens, keeping <gen> and the answer markers, dropping slots, pad and eos."""
    ids = special_ids(tok)
    drop = {ids["img"], ids["img_start"], ids["img_end"], ids["pad"], ids["eos"]}
    return tok.decode([t for t in token_ids if t not in drop], skip_special_tokens=False)
