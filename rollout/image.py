"""GvU's rollouts: prompt -> image, on either architecture. Signature of :func:`rollout.interleaved.rollout`.

Unified policy (``gvu_rollout``)
    prompt   = "\\n" description "\\n" <gen>                                (no image, loss_mask False;
                                                                              Qwen-Image: its pipeline's template
                                                                              around the description, ``gvu_prompt``)
    z_0      ~ SDE sampler conditioned on hidden(prompt)                    (window recorded)
    No text is sampled (loss_mask all False). meta["generated_latent"] = z_0 (C,h,w),
    meta["prompt_text"] = the description; the "gvu" reward (reward/gvu.py) scores it.

Janus (``janus_gvu_rollout``; ``model.arch: janus``, policy/janus.py, one joint token space, codes at V_text + c)
    prompt   = "\\n" description "\\n" <begin_of_image>                      (loss_mask False)
    c_1..c_n ~ prod_k softmax(generation_head(h_k) / T)                     (autoregressive VQ codes, KV cache)
    input_ids = prompt + (V_text + c_k);  loss_mask True and behaviour_logp = log pi(c_k | c_<k, prompt) on
    the n code tokens, so GRPO trains them through the text policy loss with the trajectory's one advantage.
    No latents and no SDE window (``images`` empty). meta["generated_codes"] = c (n,) long, decoded by the
    frozen VQ decoder where pixels are needed (the gvu reward, MLflow samples).
"""

from __future__ import annotations

import torch

from policy import qwen_image
from policy.janus import text_image_sequence
from policy.prompting import encode_prompt
from policy.trajectory import Trajectory
from rollout.engine import TextEngine
from rollout.interleaved import RolloutSettings, generate_images


def gvu_prompt(policy, description: str) -> tuple[list[int], int]:
    """GvU's prompt ids (no image slot) and how many of its leading tokens the condition skips:
    "\\n" description "\\n" <gen> and 0; for Qwen-Image, its pipeline's prompt template around the
    description's tokens and the template's system part (``policy.qwen_image.generation_prompt``)."""
    tok = policy.tokenizer
    if qwen_image.is_qwen_image(policy.cfg.generator_class):
        return qwen_image.generation_prompt(tok, tok.encode(description, add_special_tokens=False))
    return encode_prompt(tok, description, policy.n_image_tokens, with_image=False) + [policy.token_ids["gen"]], 0


@torch.no_grad()
def gvu_rollout(policy, engine: TextEngine, requests: list[dict], s: RolloutSettings, version: int,
                generator: torch.Generator | None = None) -> list[Trajectory]:
    """GvU: G images per request from its ``text`` (the description). ``engine`` is unused (no text is
    sampled); it is kept for the common signature. Any request image is ignored."""
    del engine
    rows = []  # (request, group index, (prompt ids, condition start))
    for r in requests:
        rows += [(r, g, gvu_prompt(policy, r["text"])) for g in range(s.group_size)]
    if not rows:
        return []
    empty = torch.zeros((0, *policy.latent_shape))
    # z_0 ~ p_gen(. | hidden(prompt)); cond_end = len(prompt)
    segs, finals = generate_images(policy, [p for *_, (p, _) in rows], [empty] * len(rows), s, generator,
                                   cond_starts=[k for *_, (_, k) in rows])
    out = []
    for i, (r, g, (prompt, _)) in enumerate(rows):
        t = len(prompt)
        meta = dict(r.get("meta") or {})
        meta["generated_latent"] = finals[i]
        meta["prompt_text"] = r["text"]
        out.append(Trajectory(
            prompt_id=str(r["prompt_id"]), group_index=g, input_ids=torch.tensor(prompt, dtype=torch.long),
            prompt_len=t, loss_mask=torch.zeros(t, dtype=torch.bool), behaviour_logp=torch.zeros(t),
            slot_latents=empty, images=[segs[i]], policy_version=version, response_text="", meta=meta,
        ))
    return out


NO_SLOTS = torch.zeros((0, 1, 1, 1))  # Janus: no latent image slots in the sequence


@torch.no_grad()
def janus_gvu_rollout(policy, engine: TextEngine, requests: list[dict], s: RolloutSettings, version: int,
                      generator: torch.Generator | None = None) -> list[Trajectory]:
    """GvU on a ``JanusPolicy``: G images per request's ``text``, sampled as VQ-code tokens (see the module
    docstring). ``engine`` is unused (kept for the common signature); ``s.temperature`` 0 is greedy."""
    del engine
    rows = [(r, g, policy.generation_prompt(r["text"])) for r in requests for g in range(s.group_size)]
    if not rows:
        return []
    codes, logps = policy.sample_image_tokens([p for *_, p in rows], generator=generator, temperature=s.temperature)
    out = []
    for i, (r, g, prompt) in enumerate(rows):
        ids, mask = text_image_sequence(policy, prompt, codes[i])
        behaviour = torch.zeros(ids.shape[0])
        behaviour[mask] = logps[i]
        meta = {**(r.get("meta") or {}), "generated_codes": codes[i], "prompt_text": r["text"]}
        out.append(Trajectory(
            prompt_id=str(r["prompt_id"]), group_index=g, input_ids=ids, prompt_len=len(prompt), loss_mask=mask,
            behaviour_logp=behaviour, slot_latents=NO_SLOTS, images=[], policy_version=version, meta=meta,
        ))
    return out
