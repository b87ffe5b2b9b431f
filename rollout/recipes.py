"""UAE and GvU rollouts, and the registry of rollouts by recipe name.

Every rollout has the signature of :func:`rollout.interleaved.rollout`:

    rollout(policy, engine, requests, s: RolloutSettings, version, generator) -> list[Trajectory]

and returns G = ``s.group_size`` trajectories per request, in request-major order.

UAE (image -> caption -> reconstruction)
    prompt   = <img_start> <img>*n <img_end> "\\n" instruction "\\n"       (the request's image in the slot)
    caption  ~ pi(. | prompt)                                               (text, GRPO)
    z_0      ~ SDE sampler conditioned on hidden(prompt + caption)          (window recorded: Flow-GRPO,
                                                                              or ignored with a frozen generator)
    meta["source_image"] = image (3,H,W) in [0,1];  meta["reconstruction"] = D(z_0) (3,H,W) in [0,1]
    The reconstruction is NOT in the token sequence: ``images`` holds its segment, ``slot_latents`` only
    the input image's latent. Its conditioning context is the prefix ``input_ids[:cond_end]`` (= the whole
    sequence), so the learner recomputes the window exactly as for CLEAR.
    Caveat: the context holds the input image (causal attention sees it), so the generator's condition
    is not a pure text bottleneck; with a frozen generator GRPO only moves the caption distribution.

GvU (prompt -> image)
    prompt   = "\\n" description "\\n" <gen>                                (no image, loss_mask False)
    z_0      ~ SDE sampler conditioned on hidden(prompt)                    (window recorded)
    No text is sampled (loss_mask all False). meta["generated_latent"] = z_0 (C,h,w),
    meta["prompt_text"] = the description; the "gvu" reward (reward/gvu.py) scores it.

GvU on Janus (``model.arch: janus``; policy/janus.py, one joint token space, codes at V_text + c)
    prompt   = "\n" description "\n" <begin_of_image>                      (loss_mask False)
    c_1..c_n ~ prod_k softmax(generation_head(h_k) / T)                     (autoregressive VQ codes, KV cache)
    input_ids = prompt + (V_text + c_k);  loss_mask True and behaviour_logp = log pi(c_k | c_<k, prompt) on
    the n code tokens, so GRPO trains them through the text policy loss with the trajectory's one advantage.
    No latents and no SDE window (``images`` empty). meta["generated_codes"] = c (n,) long, decoded by the
    frozen VQ decoder where pixels are needed (the gvu reward, MLflow samples).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from policy.janus import text_image_sequence
from policy.prompting import decode_response, encode_prompt
from policy.trajectory import Trajectory
from rollout import interleaved
from rollout.engine import SamplingSettings, TextEngine, TextRequest
from rollout.interleaved import RolloutSettings, generate_images

UAE_INSTRUCTION = "Describe the image in detail."

RolloutFn = Callable[..., list[Trajectory]]


def image_to_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A request image (H,W,3) uint8 (or (3,H,W) float in [0,1]) -> float32 (3,H,W) in [0,1]."""
    x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    if x.dim() != 3:
        raise ValueError(f"expected one image (H,W,3) or (3,H,W), got shape {tuple(x.shape)}")
    if x.shape[0] != 3 and x.shape[-1] == 3:
        x = x.permute(2, 0, 1)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _empty_slots(policy) -> torch.Tensor:
    return torch.zeros((0, *policy.latent_shape))


@torch.no_grad()
def uae_rollout(policy, engine: TextEngine, requests: list[dict], s: RolloutSettings, version: int,
                generator: torch.Generator | None = None) -> list[Trajectory]:
    """UAE: G (caption, reconstruction) samples per request. A request: prompt_id, image (required),
    optional ``instruction`` (default :data:`UAE_INSTRUCTION`), meta."""
    tok, ids = policy.tokenizer, policy.token_ids
    rows = []  # (request, group index, prompt ids, source (3,H,W), slot latent (1,C,h,w))
    for r in requests:
        if r.get("image") is None:
            raise ValueError(f"uae_rollout: request {r.get('prompt_id')!r} has no image")
        src = image_to_float(r["image"])
        lat = policy.encode_image(src[None]).cpu()
        prompt = encode_prompt(tok, r.get("instruction") or UAE_INSTRUCTION, policy.n_image_tokens, with_image=True)
        rows += [(r, g, prompt, src, lat) for g in range(s.group_size)]
    if not rows:
        return []
    sampling = SamplingSettings(s.temperature, s.top_p, (ids["eos"],))
    captions = engine.generate([TextRequest(p, lat, s.max_new_tokens) for _, _, p, _, lat in rows],
                               sampling, generator)
    contexts = [list(p) + c.token_ids for (_, _, p, _, _), c in zip(rows, captions)]
    # z_0 ~ p_gen(. | hidden(prompt + caption)); cond_end = len(context) = the whole sequence
    segs, finals = generate_images(policy, contexts, [lat for *_, lat in rows], s, generator)
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
            slot_latents=lat, images=[segs[i]], policy_version=version,
            response_text=decode_response(tok, c.token_ids), meta=meta,
        ))
    return out


def gvu_prompt(policy, description: str) -> list[int]:
    """GvU's prompt ids: "\\n" description "\\n" <gen> (no image slot)."""
    body = encode_prompt(policy.tokenizer, description, policy.n_image_tokens, with_image=False)
    return body + [policy.token_ids["gen"]]


@torch.no_grad()
def gvu_rollout(policy, engine: TextEngine, requests: list[dict], s: RolloutSettings, version: int,
                generator: torch.Generator | None = None) -> list[Trajectory]:
    """GvU: G images per request from its ``text`` (the description). ``engine`` is unused (no text is
    sampled); it is kept for the common signature. Any request image is ignored."""
    del engine
    rows = []  # (request, group index, prompt ids)
    for r in requests:
        rows += [(r, g, gvu_prompt(policy, r["text"])) for g in range(s.group_size)]
    if not rows:
        return []
    empty = _empty_slots(policy)
    # z_0 ~ p_gen(. | hidden(prompt)); cond_end = len(prompt)
    segs, finals = generate_images(policy, [p for *_, p in rows], [empty] * len(rows), s, generator)
    out = []
    for i, (r, g, prompt) in enumerate(rows):
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


ROLLOUTS: dict[str, RolloutFn] = {"clear": interleaved.rollout, "uae": uae_rollout, "gvu": gvu_rollout}
JANUS_ROLLOUTS: dict[str, RolloutFn] = {"gvu": janus_gvu_rollout}  # what model.arch 'janus' runs


def get_rollout(recipe: str, arch: str = "unified") -> RolloutFn:
    """The rollout function of a recipe (``clear`` | ``uae`` | ``gvu``) for a model architecture."""
    table = JANUS_ROLLOUTS if arch == "janus" else ROLLOUTS
    try:
        return table[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r} for model.arch {arch!r}; known: {', '.join(table)}") from None
