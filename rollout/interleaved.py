"""CLEAR's generate-then-answer rollout, as one batched procedure over prompts x group samples.

1. Sample text from prompt (image slot + question); stop at <eos> or <gen>.
2. Rows that stopped at <gen> (and may still generate): the LM's hidden states of the context condition
   the generator; the SDE sampler draws a latent and records its stochastic window (log-probs kept).
   What the denoising-step rewards score, recorded on each trajectory that generated, when asked for:
   ``RolloutSettings.reference_latents``: ``meta["reference_latent"]``, the latent of the request's
   ``meta["reference_image"]`` (CLEAR: the clean image; ``latent_quality``); ``gold_answer_logprob``:
   ``meta["answer_logprob"]``, log p(gold answer | context up to its generated image) (``answer_likelihood``).
3. The latent enters the context through the bridge (an image slot after <gen>, no decode/re-encode; the
   ablation ``model.read_generation: pixels`` decodes and re-encodes it) and text sampling continues to the
   answer. A second <gen> ends the response (it then has no answer).

``RolloutSettings.generation`` decides step 1 (evaluation's "does generating help?"): ``auto`` lets the model
choose; ``force`` opens every response with <gen> (not sampled: loss mask False, log-prob 0), so every
trajectory holds a generated latent, even with ``max_images`` 0; ``forbid`` never samples <gen> (its logit is
-inf), so no trajectory generates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy.prompting import decode_response, encode_prompt, mask_unsampleable
from policy.sde import draw_normal, restoration_plan, restoration_sources, sample_latents, window_starts
from policy.trajectory import ImageSegment, Trajectory
from policy.vision import empty_images, stack_images
from rollout.engine import SamplingSettings, TextCompletion, TextEngine, TextRequest

GENERATION_MODES = ("auto", "force", "forbid")


@dataclass(frozen=True)
class RolloutSettings:
    group_size: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_images: int = 1
    sde_steps: int = 8
    sde_window: int = 2
    sde_window_position: str = "random"
    sde_window_start: int = 0
    sde_noise_level: float = 0.7
    sde_strength: float = 1.0  # < 1: a restoration starts from the input image's latent (policy.sde.restoration_start)
    generation: str = "auto"  # auto | force | forbid (module docstring)
    reference_latents: bool = False  # record meta["reference_latent"] on each trajectory that generated (docstring)
    gold_answer_logprob: bool = False  # record meta["answer_logprob"] after each generated image (module docstring)

    def __post_init__(self) -> None:
        if self.generation not in GENERATION_MODES:
            raise ValueError(f"generation must be one of {GENERATION_MODES}, got {self.generation!r}")
        if not 0.0 < self.sde_strength <= 1.0:
            raise ValueError(f"sde_strength must be in (0, 1], got {self.sde_strength}")


def _right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return ids, attn


@torch.no_grad()
def generate_images(policy, contexts: list[list[int]], latents: list[torch.Tensor], s: RolloutSettings,
                    generator: torch.Generator | None, vision: list[torch.Tensor] | None = None,
                    cond_starts: list[int] | None = None, sources: torch.Tensor | None = None
                    ) -> tuple[list[ImageSegment], torch.Tensor]:
    """Latents conditioned on each context's hidden states (from ``cond_starts``, default 0, to its end);
    returns their segments and final latents, on the CPU. ``sources`` (B, C, h, w): the latents a restoration
    starts from (``policy.sde.restoration_start``, sigmas from ``s.sde_strength`` to 0; None: from noise,
    sigmas from 1). The LM and the sampler run on the policy's device;
    the noise is drawn on ``generator``'s (the CPU) and moved, so a seed gives the same noise on any device."""
    dev = policy.device
    ids, attn = _right_padded(contexts, policy.token_ids["pad"])
    _, hidden = policy.lm_forward(ids.to(dev), attn.to(dev), torch.cat(latents).to(dev),
                                  images=None if vision is None else stack_images(vision))
    cond_end = torch.tensor([len(c) for c in contexts])
    cond_start = torch.tensor(cond_starts or [0] * len(contexts))
    enc, pooled = policy.condition(hidden, cond_end, cond_start=cond_start)
    b = len(contexts)
    noise = draw_normal((b, *policy.latent_shape), generator, dev)
    starts = window_starts(b, s.sde_steps, s.sde_window, s.sde_window_position, s.sde_window_start, generator)
    start, sigmas = restoration_plan(noise, sources, s.sde_strength, policy.sigmas(s.sde_steps))
    rec = sample_latents(lambda x, sig: policy.velocity(x, sig, enc, pooled), start, sigmas,
                         s.sde_window, s.sde_noise_level, starts, generator).to("cpu")
    segs = [
        ImageSegment(cond_end=int(cond_end[i]), latents=rec.latents[i], next_latents=rec.next_latents[i],
                     sigmas=rec.sigmas[i], sigma_nexts=rec.sigma_nexts[i], log_probs=rec.log_probs[i],
                     final_latent=rec.final[i], cond_start=int(cond_start[i]))
        for i in range(b)
    ]
    return segs, rec.final


@torch.no_grad()
def rollout(policy, engine: TextEngine, requests: list[dict], s: RolloutSettings, version: int,
            generator: torch.Generator | None = None) -> list[Trajectory]:
    """G trajectories per request. A request: prompt_id, text, image (H,W,3 uint8 or None), meta."""
    tok, ids = policy.tokenizer, policy.token_ids
    forced = s.generation == "force"
    banned = (ids["gen"],) if s.generation == "forbid" else ()
    sampling = SamplingSettings(s.temperature, s.top_p, (ids["eos"], ids["gen"]), banned)
    rows = []  # (request, group index, prompt ids, slot latents)
    vision = []  # per row: the input images a VLM's tower reads (policy.input_image, model.input_image)
    for r in requests:
        image = r.get("image")
        if image is not None:
            slot, lat, vis = policy.input_image(image)  # CPU tensors; the engine moves them
        else:
            slot, lat, vis = [], torch.zeros((0, *policy.latent_shape)), empty_images()
        prompt = slot + encode_prompt(tok, r["text"], policy.n_image_tokens, with_image=False)
        rows += [(r, g, prompt, lat) for g in range(s.group_size)]
        vision += [vis] * s.group_size
    if forced:  # every response opens with <gen>, which the policy did not sample
        first = [TextCompletion([ids["gen"]], [0.0], "stop") for _ in rows]
    else:
        first = engine.generate([TextRequest(p, lat, s.max_new_tokens, v) for (_, _, p, lat), v in zip(rows, vision)],
                                sampling, generator)
    seqs = [list(p) + c.token_ids for (_, _, p, _), c in zip(rows, first)]
    masks = [[False] * len(p) + [not forced] * len(c.token_ids) for (_, _, p, _), c in zip(rows, first)]
    logps = [[0.0] * len(p) + c.logprobs for (_, _, p, _), c in zip(rows, first)]
    slot_lat = [lat for *_, lat in rows]
    images: list[list[ImageSegment]] = [[] for _ in rows]
    gen_rows = [i for i, c in enumerate(first)
                if (s.max_images > 0 or forced) and c.finish == "stop" and c.token_ids[-1] == ids["gen"]
                and len(c.token_ids) < s.max_new_tokens]
    if gen_rows:
        segs, finals = generate_images(policy, [seqs[i] for i in gen_rows], [slot_lat[i] for i in gen_rows], s, generator,
                                       [vision[i] for i in gen_rows], sources=restoration_sources(
                                           [slot_lat[i] for i in gen_rows], s.sde_strength))
        slot, read = policy.image_placeholder_ids(), policy.generated_slot(finals)
        for j, i in enumerate(gen_rows):
            images[i].append(segs[j])
            seqs[i] += slot
            masks[i] += [False] * len(slot)
            logps[i] += [0.0] * len(slot)
            slot_lat[i] = torch.cat([slot_lat[i], read[j : j + 1]])
        if s.gold_answer_logprob:
            gold = _gold_answer_logprobs(policy, [seqs[i] for i in gen_rows], [slot_lat[i] for i in gen_rows],
                                         [vision[i] for i in gen_rows], [rows[i][0] for i in gen_rows])
        budgets = [s.max_new_tokens - len(first[i].token_ids) for i in gen_rows]
        second = engine.generate([TextRequest(seqs[i], slot_lat[i], n, vision[i]) for i, n in zip(gen_rows, budgets)],
                                 sampling, generator)
        for i, c in zip(gen_rows, second):
            seqs[i] += c.token_ids
            masks[i] += [True] * len(c.token_ids)
            logps[i] += c.logprobs
    references = _reference_latents(policy, [rows[i][0] for i in gen_rows]) if s.reference_latents else []
    out = []
    for i, (r, g, prompt, _) in enumerate(rows):
        sampled = seqs[i][len(prompt):]  # the response; decode_response drops its image slots
        out.append(Trajectory(
            prompt_id=str(r["prompt_id"]), group_index=g, input_ids=torch.tensor(seqs[i], dtype=torch.long),
            prompt_len=len(prompt), loss_mask=torch.tensor(masks[i]), behaviour_logp=torch.tensor(logps[i]),
            slot_latents=slot_lat[i], images=images[i], policy_version=version,
            vision_images=vision[i],
            response_text=decode_response(tok, sampled),
            meta={k: v for k, v in (r.get("meta") or {}).items() if k != "reference_image"},  # read here only
        ))
    for i, ref in zip(gen_rows, references):
        if ref is not None:
            out[i].meta["reference_latent"] = ref
    for i, lp in zip(gen_rows, gold if s.gold_answer_logprob and gen_rows else []):
        if lp is not None:
            out[i].meta["answer_logprob"] = lp
    return out


def _gold_answer_logprobs(policy, contexts: list[list[int]], latents: list[torch.Tensor], vision: list[torch.Tensor],
                          requests: list[dict]) -> list[float | None]:
    """log p(<answer_start> gold <answer_end> | context) summed over the gold tokens, teacher-forced after each
    context (a response up to its generated image), in one LM pass; None for a request without a gold answer
    (``meta["answer"]``; a list: its first)."""
    tok, ids = policy.tokenizer, policy.token_ids
    golds = []
    for r in requests:
        a = (r.get("meta") or {}).get("answer")
        a = a[0] if isinstance(a, (list, tuple)) and a else a
        golds.append(None if a is None else
                     [ids["answer_start"], *tok.encode(str(a), add_special_tokens=False), ids["answer_end"]])
    rows = [k for k, g in enumerate(golds) if g is not None]
    out: list[float | None] = [None] * len(requests)
    if not rows:
        return out
    full = [contexts[k] + golds[k] for k in rows]
    x, attn = _right_padded(full, ids["pad"])
    dev = policy.device
    logits, _ = policy.lm_forward(x.to(dev), attn.to(dev), torch.cat([latents[k] for k in rows]).to(dev),
                                  images=stack_images([vision[k] for k in rows]))
    logp = torch.log_softmax(mask_unsampleable(logits.float(), ids), -1).cpu()
    for j, k in enumerate(rows):
        start, n = len(contexts[k]), len(golds[k])  # logits at t predict token t + 1
        targets = x[j, start : start + n]
        out[k] = float(logp[j, start - 1 : start + n - 1].gather(-1, targets[:, None]).sum())
    return out


def _reference_latents(policy, requests: list[dict]) -> list[torch.Tensor | None]:
    """The latent (C, h, w) of each request's ``meta["reference_image"]`` (one VAE pass per distinct request),
    None where it has none."""
    refs = {id(r): r["meta"]["reference_image"] for r in requests
            if (r.get("meta") or {}).get("reference_image") is not None}
    if not refs:
        return [None] * len(requests)
    pixels = torch.stack([torch.tensor(x).permute(2, 0, 1) for x in refs.values()]).float() / 255.0
    latent = dict(zip(refs, policy.encode_image(pixels).cpu()))
    return [latent.get(id(r)) for r in requests]
