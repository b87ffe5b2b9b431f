"""UAE's rollout: image -> caption -> reconstruction from the caption alone. Signature of
:func:`rollout.interleaved.rollout`.

    prompt   = [image] "\\n" instruction "\\n"     [image]: the request's image as model.input_image shows it
                                                  (``UnifiedPolicy.input_image``): the bridge slot
                                                  <img_start> <img>*n <img_end> for a causal LM; a VLM's
                                                  own vision run (its tower's features) and / or the slot
    caption  ~ pi(. | prompt)                                               (text, GRPO)
    cond     = "\\n" caption "\\n" <gen>                                    (a generation prompt: GvU's layout,
                                                                              the caption's own tokens, no image;
                                                                              Qwen-Image: its pipeline's template
                                                                              around the caption, see
                                                                              ``caption_condition``)
    z_0      ~ SDE sampler conditioned on hidden(cond)                      (window recorded: Flow-GRPO,
                                                                              or ignored with a frozen generator)
    meta["source_image"] = image (3,H,W) in [0,1];  meta["reconstruction"] = D(z_0) (3,H,W) in [0,1]

Text is the only latent (UAE's auto-encoder): the generator never attends to the input image, only to the
caption. The reconstruction is NOT in the token sequence: ``images`` holds its segment with ``cond_ids`` =
``cond``, from which the learner recomputes the window's condition (``learner.objective``).
"""

from __future__ import annotations

import numpy as np
import torch

from policy import qwen_image
from policy.prompting import decode_response, encode_prompt
from policy.trajectory import Trajectory
from policy.vision import image_to_uint8
from rollout.engine import SamplingSettings, TextEngine, TextRequest
from rollout.interleaved import RolloutSettings, generate_images
from tasks.describe import CAPTION_INSTRUCTION as UAE_INSTRUCTION


def image_to_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A request image (H,W,3) uint8 (or (3,H,W) float in [0,1]) -> float32 (3,H,W) in [0,1]."""
    x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    if x.dim() != 3:
        raise ValueError(f"expected one image (H,W,3) or (3,H,W), got shape {tuple(x.shape)}")
    if x.shape[0] != 3 and x.shape[-1] == 3:
        x = x.permute(2, 0, 1)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def caption_text_ids(caption_ids: list[int], ids: dict[str, int]) -> list[int]:
    """The caption proper: the tokens between <answer> and </answer> when the policy wrote the markers (as
    stage 1 teaches it: ``recipes.uae``), else every token it wrote; end-of-sequence tokens dropped."""
    body = [t for t in caption_ids if t != ids["eos"]]
    if ids["answer_start"] in body:
        body = body[body.index(ids["answer_start"]) + 1:]
        body = body[: body.index(ids["answer_end"])] if ids["answer_end"] in body else body
    return body


def caption_condition(policy, caption_ids: list[int]) -> tuple[list[int], int]:
    """The generation prompt of a caption and how many of its leading tokens the condition skips, built from
    the sampled ids (``caption_text_ids``), so the caption is exactly what the policy wrote:
    "\\n" caption "\\n" <gen> and 0 (GvU's layout, ``rollout.image``, which stage 1 trains the generator on);
    for Qwen-Image, its pipeline's prompt template around the caption and the template's system part
    (``policy.qwen_image.generation_prompt``)."""
    tok, ids = policy.tokenizer, policy.token_ids
    body = caption_text_ids(caption_ids, ids)
    if qwen_image.is_qwen_image(policy.cfg.generator_class):
        return qwen_image.generation_prompt(tok, body)
    newline = tok.encode("\n", add_special_tokens=False)
    return newline + body + newline + [ids["gen"]], 0


@torch.no_grad()
def uae_rollout(policy, engine: TextEngine, requests: list[dict], s: RolloutSettings, version: int,
                generator: torch.Generator | None = None) -> list[Trajectory]:
    """UAE: G (caption, reconstruction) samples per request. A request: prompt_id, image (required),
    optional ``instruction`` (default :data:`UAE_INSTRUCTION`), meta."""
    tok, ids = policy.tokenizer, policy.token_ids
    rows = []  # (request, group index, prompt ids, source (3,H,W), slot latents (0 or 1, C,h,w))
    vision = []  # per row: the input image a VLM's tower reads (0 or 1, H, W, 3) uint8
    for r in requests:
        if r.get("image") is None:
            raise ValueError(f"uae_rollout: request {r.get('prompt_id')!r} has no image")
        src = image_to_float(r["image"])
        run, lat, vis = policy.input_image(image_to_uint8(src))
        prompt = run + encode_prompt(tok, r.get("instruction") or UAE_INSTRUCTION, policy.n_image_tokens,
                                     with_image=False)
        rows += [(r, g, prompt, src, lat) for g in range(s.group_size)]
        vision += [vis] * s.group_size
    if not rows:
        return []
    sampling = SamplingSettings(s.temperature, s.top_p, (ids["eos"],))
    captions = engine.generate([TextRequest(p, lat, s.max_new_tokens, v) for (_, _, p, _, lat), v in zip(rows, vision)],
                               sampling, generator)
    contexts = [list(p) + c.token_ids for (_, _, p, _, _), c in zip(rows, captions)]
    # z_0 ~ p_gen(. | hidden(cond)): the caption alone, as a generation prompt
    conds, starts = zip(*(caption_condition(policy, c.token_ids) for c in captions))
    no_slots = torch.zeros((0, *policy.latent_shape))
    segs, finals = generate_images(policy, list(conds), [no_slots] * len(conds), s, generator, cond_starts=list(starts))
    for seg, cond in zip(segs, conds):
        seg.cond_ids = torch.tensor(cond, dtype=torch.long)
    recon = policy.decode_latent(finals.to(policy.device)).cpu()
    out = []
    for i, ((r, g, prompt, src, lat), c) in enumerate(zip(rows, captions)):
        meta = dict(r.get("meta") or {})
        meta["source_image"] = src
        meta["reconstruction"] = recon[i]
        out.append(Trajectory(
            prompt_id=str(r["prompt_id"]), group_index=g,
            input_ids=torch.tensor(contexts[i], dtype=torch.long), prompt_len=len(prompt),
            loss_mask=torch.tensor([False] * len(prompt) + [True] * len(c.token_ids)),
            behaviour_logp=torch.tensor([0.0] * len(prompt) + list(c.logprobs)),
            slot_latents=lat, images=[segs[i]], policy_version=version, vision_images=vision[i],
            response_text=decode_response(tok, c.token_ids), meta=meta,
        ))
    return out
