"""Stage-1 (CLEAR) supervised examples: generate-then-answer targets on degraded images.

A degraded image's target is ``<gen> [slot] <answer>X</answer>``: the model learns to trigger generation,
the generator learns (flow matching, conditioned on the context up to <gen>) to restore the clean latent,
and the answer is read from the degraded input and, through the bridge, the slot. The slot holds the
model's OWN generation (Euler sampling, no gradient), as at rollout time: teacher-forcing the clean latent
there teaches an answer path that rollouts never see. A clean image's target is the answer alone, so the
model learns when generation is worth it.
"""

from __future__ import annotations

import numpy as np
import torch

from learner.batch import TrainBatch, collate
from policy.prompting import encode_prompt, encode_target
from policy.sde import flow_sigmas, sample_ode
from policy.trajectory import ImageSegment, Trajectory


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def own_generations(policy, contexts: list[list[int]], input_latents: torch.Tensor, steps: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Latents the policy generates (ODE) from each context (ending in <gen>) with one input image each."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), policy.token_ids["pad"], dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, : len(c)], attn[i, : len(c)] = torch.tensor(c), 1
    dev = policy.device  # noise is drawn on the CPU (the generator's device), then moved
    _, hidden = policy.lm_forward(ids.to(dev), attn.to(dev), input_latents.to(dev))
    enc, pooled = policy.condition(hidden, torch.tensor([len(c) for c in contexts]))
    noise = torch.randn((len(contexts), *policy.latent_shape), generator=generator).to(dev)
    return sample_ode(lambda x, s: policy.velocity(x, s, enc, pooled), noise, flow_sigmas(steps)).cpu()


@torch.no_grad()
def sft_batch(policy, examples: list[dict], steps: int = 8, generator: torch.Generator | None = None) -> TrainBatch:
    """examples: {text, image (H,W,3 uint8) or None, clean_image, answer, generate: bool}.

    ``image: None`` gives a text-only prompt (no image slot): with ``generate`` the generator learns to make
    ``clean_image`` from the text alone (GvU's text -> image warm start)."""
    tok, n = policy.tokenizer, policy.n_image_tokens
    clean = policy.encode_image(_pixels([e["clean_image"] for e in examples])).cpu()  # the batch is built on the CPU
    with_image = [e.get("image") is not None for e in examples]
    shown = [e["image"] for e, w in zip(examples, with_image) if w]
    enc = policy.encode_image(_pixels(shown)).cpu() if shown else clean[:0]
    pos = [sum(with_image[:i]) for i in range(len(examples))]
    inputs = [enc[pos[i] : pos[i] + 1] if w else clean[:0] for i, w in enumerate(with_image)]  # (0 or 1, C,h,w)
    prompts = [encode_prompt(tok, e["text"], n, with_image=w) for e, w in zip(examples, with_image)]
    gen_rows = [i for i, e in enumerate(examples) if e["generate"]]
    own = {}
    if gen_rows:
        made = own_generations(policy, [prompts[i] + [policy.token_ids["gen"]] for i in gen_rows],
                               torch.cat([inputs[i] for i in gen_rows]), steps, generator)
        own = {i: made[j : j + 1] for j, i in enumerate(gen_rows)}
    trajs = []
    for i, e in enumerate(examples):
        target, mask = encode_target(tok, e["answer"], n, e["generate"])
        ids = torch.tensor(prompts[i] + target, dtype=torch.long)
        slots, images = inputs[i], []
        if e["generate"]:
            slots = torch.cat([slots, own[i]])
            empty = clean.new_zeros((0, *clean.shape[1:]))
            images = [ImageSegment(cond_end=len(prompts[i]) + 1, latents=empty, next_latents=empty,
                                   sigmas=torch.zeros(0), sigma_nexts=torch.zeros(0), log_probs=torch.zeros(0),
                                   final_latent=clean[i])]  # the flow-matching target
        trajs.append(Trajectory(
            prompt_id=str(i), group_index=0, input_ids=ids, prompt_len=len(prompts[i]),
            loss_mask=torch.tensor([False] * len(prompts[i]) + mask), behaviour_logp=torch.zeros(len(ids)),
            slot_latents=slots, images=images,
        ))
    return collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
