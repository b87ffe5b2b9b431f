"""Stage-1 (CLEAR) supervised examples: generate-then-answer targets on degraded images.

A degraded image's target is ``<gen> [slot] <answer>X</answer>``: the model learns to trigger generation,
the generator learns (flow matching, conditioned on the context up to <gen>) to restore the clean latent,
and the answer is read from the degraded input and, through the bridge, the slot. The slot holds the
model's OWN generation (Euler sampling from the rollout's start, no gradient), as at rollout time; a
``sft.clean_slot_prob`` share holds the clean latent instead (teacher forcing: the reader learns to read the
slot, which its own early generations give it no reason to). A clean image's target is the answer alone, so the
model learns when generation is worth it.

The input image enters the prompt as in the rollouts (``UnifiedPolicy.input_image``, ``model.input_image``):
the bridge slot for a causal LM; a vision-language model's own tower (its ``<|image_pad|>`` run, the raw image
kept in ``vision_images``) for ``vision``; both, the tower's run then the bridge slot, for ``both`` (the bridge
then learns to read the input image's latent beside the tower's features: CLEAR's bridge warm start).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from learner.batch import TrainBatch, collate
from learner.sharding import padding_donors, split_evenly
from policy.prompting import encode_prompt, encode_target
from policy.sde import restoration_plan, restoration_sources, sample_ode
from policy.trajectory import ImageSegment, Trajectory
from policy.vision import empty_images, stack_images


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class SFTShard:
    """One rank's part of a stage-1 step over a global batch of examples."""

    batch: TrainBatch  # this rank's examples (and a zero-weight padding one where needed)
    flow_noise: torch.Tensor  # (S, C, h, w): eps of each image segment's flow-matching target
    flow_times: torch.Tensor  # (S,): its position u on the path (policy.sde.restoration_flow)
    flow_sources: torch.Tensor | None  # (S, C, h, w): the input latents a restoration starts from (strength < 1)
    strength: float  # rollout.sde.strength: the path runs from sigma = strength
    tokens: int  # target tokens of the global batch
    images: int  # image targets of the global batch


@torch.no_grad()
def own_generations(policy, contexts: list[list[int]], input_latents: torch.Tensor, steps: int,
                    noise: torch.Tensor, vision_images: torch.Tensor | None = None,
                    sources: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Latents the policy generates (ODE from ``noise``, or from the noised ``sources`` at ``strength`` < 1,
    as the rollouts do) from each context (ending in <gen>) with its input image's slot latents
    (``input_latents``, row-major) and a VLM tower's input images (``vision_images``)."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), policy.token_ids["pad"], dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, : len(c)], attn[i, : len(c)] = torch.tensor(c), 1
    dev = policy.device
    _, hidden = policy.lm_forward(ids.to(dev), attn.to(dev), input_latents.to(dev), images=vision_images)
    enc, pooled = policy.condition(hidden, torch.tensor([len(c) for c in contexts]))
    start, sigmas = restoration_plan(noise.to(dev), sources, strength, policy.sigmas(steps))
    return sample_ode(lambda x, s: policy.velocity(x, s, enc, pooled), start, sigmas).cpu()


def _rank_rows(examples: list[dict], rank: int, world: int) -> tuple[list[int], list[int]]:
    """(this rank's example indices, its zero-weight padding ones): an even split, padded
    (``learner.sharding.padding_donors``) so every sub-module runs on every rank."""
    rows = split_evenly(list(range(len(examples))), world)[rank]
    gen = [i for i, e in enumerate(examples) if e["generate"]]
    shown = [i for i, e in enumerate(examples) if e.get("image") is not None]
    return rows, padding_donors(list(range(len(examples))), [gen, shown], rows)


@torch.no_grad()
def sft_shard(policy, examples: list[dict], steps: int = 8, generator: torch.Generator | None = None,
              rank: int = 0, world: int = 1, strength: float = 1.0, clean_slot_prob: float = 0.0) -> SFTShard:
    """examples: {text, image (H,W,3 uint8) or None, clean_image, answer, generate: bool}, the global batch.

    ``image: None`` gives a text-only prompt (no image slot): with ``generate`` the generator learns to make
    ``clean_image`` from the text alone (GvU's text -> image warm start). Noise is drawn for the whole
    batch on every rank (the same draws whatever the world size) and each rank keeps its rows'.
    ``clean_slot_prob``: the share of generate-then-answer examples whose slot holds the clean latent instead
    of the model's own generation (teacher forcing the reader on what a perfect restoration shows)."""
    tok, n = policy.tokenizer, policy.n_image_tokens
    gen_all = [i for i, e in enumerate(examples) if e["generate"]]
    shape = (len(gen_all), *policy.latent_shape)
    ode_noise = torch.randn(shape, generator=generator) if gen_all else None
    eps = torch.randn(shape, generator=generator) if gen_all else torch.zeros(shape)
    times = torch.rand(len(gen_all), generator=generator) if gen_all else torch.zeros(0)
    clean_slot = (torch.rand(len(gen_all), generator=generator) < clean_slot_prob if clean_slot_prob > 0
                  else torch.zeros(len(gen_all), dtype=torch.bool))  # drawn only when used: runs without it unchanged
    tokens = sum(sum(encode_target(tok, e["answer"], n, e["generate"])[1]) for e in examples)
    rows, padding = _rank_rows(examples, rank, world)
    picked = rows + padding
    local = [examples[i] for i in picked]
    clean = policy.encode_image(_pixels([e["clean_image"] for e in local])).cpu()  # the batch is built on the CPU
    # each input image as the rollouts show it: (token run, slot latents (0 or 1, C,h,w), tower images (0 or 1))
    with_image = [j for j, e in enumerate(local) if e.get("image") is not None]
    read = dict(zip(with_image, policy.input_images([local[j]["image"] for j in with_image])))  # one VAE pass
    shown = [read.get(j, ([], clean[:0], empty_images())) for j in range(len(local))]
    inputs, vision = [lat for _, lat, _ in shown], [vis for _, _, vis in shown]
    prompts = [run + encode_prompt(tok, e["text"], n, with_image=False) for (run, _, _), e in zip(shown, local)]
    gen_local = [j for j, i in enumerate(picked) if examples[i]["generate"]]
    noise_row = {j: gen_all.index(picked[j]) for j in gen_local}
    own, sources = {}, None
    if gen_local:
        sources = restoration_sources([inputs[j] for j in gen_local], strength)
        made = own_generations(policy, [prompts[j] + [policy.token_ids["gen"]] for j in gen_local],
                               torch.cat([inputs[j] for j in gen_local]), steps,
                               ode_noise[[noise_row[j] for j in gen_local]],
                               stack_images([vision[j] for j in gen_local]), sources, strength)
        taught = clean_slot[[noise_row[j] for j in gen_local]]
        made = torch.where(taught.view(-1, 1, 1, 1), clean[gen_local], made)
        made = policy.generated_slot(made)
        own = {j: made[k : k + 1] for k, j in enumerate(gen_local)}
    trajs = []
    for j, e in enumerate(local):
        target, mask = encode_target(tok, e["answer"], n, e["generate"])
        ids = torch.tensor(prompts[j] + target, dtype=torch.long)
        slots, images = inputs[j], []
        if e["generate"]:
            slots = torch.cat([slots, own[j]])
            empty = clean.new_zeros((0, *clean.shape[1:]))
            images = [ImageSegment(cond_end=len(prompts[j]) + 1, latents=empty, next_latents=empty,
                                   sigmas=torch.zeros(0), sigma_nexts=torch.zeros(0), log_probs=torch.zeros(0),
                                   final_latent=clean[j])]  # the flow-matching target
        trajs.append(Trajectory(
            prompt_id=str(picked[j]), group_index=0, input_ids=ids, prompt_len=len(prompts[j]),
            loss_mask=torch.tensor([False] * len(prompts[j]) + mask), behaviour_logp=torch.zeros(len(ids)),
            slot_latents=slots, images=images, vision_images=vision[j],
        ))
    batch = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
    batch.row_weight[len(rows):] = 0.0
    batch.seg_weight = batch.row_weight[batch.seg_rows].clone()
    keep = [noise_row[j] for j in gen_local]
    return SFTShard(batch, eps[keep], times[keep], sources, strength, int(tokens), len(gen_all))
