"""Stage-1 (CLEAR) supervised examples: generate-then-answer targets on degraded images.

A degraded image's target is ``<gen> [slot: clean latent] <answer>X</answer>``: the model learns to
trigger generation, the generator learns (flow matching, conditioned on the context up to <gen>) to
restore the clean latent, and the bridge carries that latent into the answer. A clean image's target is
the answer alone, so the model learns when generation is worth it.
"""

from __future__ import annotations

import numpy as np
import torch

from learner.batch import TrainBatch, collate
from policy.prompting import encode_prompt, encode_target
from policy.trajectory import ImageSegment, Trajectory


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def sft_batch(policy, examples: list[dict]) -> TrainBatch:
    """examples: {text, image (H,W,3 uint8), clean_image, answer, generate: bool}."""
    tok, n = policy.tokenizer, policy.n_image_tokens
    degraded = policy.encode_image(_pixels([e["image"] for e in examples]))
    clean = policy.encode_image(_pixels([e["clean_image"] for e in examples]))
    trajs = []
    for i, e in enumerate(examples):
        prompt = encode_prompt(tok, e["text"], n)
        target, mask = encode_target(tok, e["answer"], n, e["generate"])
        ids = torch.tensor(prompt + target, dtype=torch.long)
        slots, images = degraded[i : i + 1], []
        if e["generate"]:
            slots = torch.cat([slots, clean[i : i + 1]])
            empty = clean.new_zeros((0, *clean.shape[1:]))
            images = [ImageSegment(cond_end=len(prompt) + 1, latents=empty, next_latents=empty,
                                   sigmas=torch.zeros(0), sigma_nexts=torch.zeros(0), log_probs=torch.zeros(0),
                                   final_latent=clean[i])]
        trajs.append(Trajectory(
            prompt_id=str(i), group_index=0, input_ids=ids, prompt_len=len(prompt),
            loss_mask=torch.tensor([False] * len(prompt) + mask), behaviour_logp=torch.zeros(len(ids)),
            slot_latents=slots, images=images,
        ))
    return collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
