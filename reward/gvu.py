"""GvU reward (Generation via Understanding): the policy's OWN understanding branch scores its generation.

For a generated latent z and the prompt's description d = (d_1..d_m):

    sequence = <img_start> bridge(z)*n <img_end> "\\n" instruction "\\n" d_1 .. d_m
    r(z, d)  = exp( (1/m) sum_j log p_theta(d_j | image, instruction, d_<j) )      (geometric mean, in (0, 1])

one teacher-forced forward (``UnifiedPolicy.token_logprobs``) per batch; the latent enters the LM through
the bridge, as everywhere else (no decode / re-encode).

Weights: the reward must use the CURRENT policy. The reward actor holds its own ``UnifiedPolicy``
(``resources["policy"]``, or built by :func:`gvu_setup` from ``kwargs``). After each learner step the driver
calls the reward actor's weight update with the SAME ``WeightHandle`` it sends to the rollout workers; the
actor receives the tensors with its ``WeightReceiver`` and applies them with
:func:`gvu_sync` ``(policy, receiver.receive(handle, timeout_s), version)``. (That wiring lives in the driver
and the reward actor, not here; ``reward/`` does not import ``learner/``.) ``GvUState.version`` tells which
policy version scored a batch.

Registered as ``"gvu"``; trajectories need ``meta["generated_latent"]`` (C,h,w) (or a generated image
segment) and ``meta["prompt_text"]`` (both written by ``rollout.recipes.gvu_rollout``). kwargs:
``instruction`` (default "Describe the image"), ``max_batch`` (default 32), and, without a policy in
``resources``, ``policy_path`` (a ``save_pretrained`` directory) or ``policy_config`` (a PolicyConfig dict).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from policy.prompting import encode_prompt
from reward.registry import RewardContext, register_reward, traj_meta

INSTRUCTION = "Describe the image"


@dataclass
class GvUState:
    """What ``setup`` builds once per reward set: the scoring policy and its settings."""

    policy: Any
    instruction: str = INSTRUCTION
    max_batch: int = 32
    version: int = 0


def _sequences(policy, descriptions: Sequence[str], instruction: str) -> tuple[list[list[int]], list[int]]:
    """Token rows [image slot, instruction, description] and where each description starts."""
    prefix = encode_prompt(policy.tokenizer, instruction, policy.n_image_tokens, with_image=True)
    rows, starts = [], []
    for d in descriptions:
        desc = policy.tokenizer.encode(d, add_special_tokens=False)
        rows.append(prefix + desc)
        starts.append(len(prefix))
    return rows, starts


@torch.no_grad()
def gvu_scores(policy, latents: torch.Tensor, descriptions: Sequence[str], *, instruction: str = INSTRUCTION,
               max_batch: int = 32) -> torch.Tensor:
    """(B,) float32 rewards exp(mean_j log p(d_j | image, instruction, d_<j)); NaN for an empty description.

    ``latents`` (B, C, h, w) go through the bridge at the image slot; rows are right-padded and scored
    ``max_batch`` at a time (right padding leaves the real positions' values unchanged).
    """
    if latents.dim() != 4 or latents.shape[0] != len(descriptions):
        raise ValueError(f"gvu_scores: latents {tuple(latents.shape)} vs {len(descriptions)} descriptions")
    rows, starts = _sequences(policy, descriptions, instruction)
    pad = policy.token_ids["pad"]
    out = torch.full((len(rows),), math.nan, dtype=torch.float32)
    for lo in range(0, len(rows), max_batch):
        chunk = range(lo, min(lo + max_batch, len(rows)))
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # description positions
        attn = torch.zeros_like(ids)
        for j, i in enumerate(chunk):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            attn[j, : len(rows[i])] = 1
            scored[j, starts[i] : len(rows[i])] = True
        dev = policy.device
        logp, _ = policy.token_logprobs(ids.to(dev), attn.to(dev), latents[lo : lo + len(chunk)].to(dev))
        m = scored.to(dev).float()
        n = m.sum(-1)
        mean_logp = (logp.float() * m).sum(-1) / n.clamp(min=1)  # (1/m) sum_j log p(d_j | ...)
        score = torch.where(n > 0, mean_logp.exp(), torch.full_like(mean_logp, math.nan))
        out[lo : lo + len(chunk)] = score.cpu()
    return out


def gvu_sync(policy, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
             version: int | None = None, state: GvUState | None = None) -> int:
    """Load the learner's published trainable tensors into the reward's policy (in place); returns the count.

    ``named_tensors`` is what ``WeightReceiver.receive(handle, timeout_s)`` yields for the same handle the
    rollout workers get. With ``state`` and ``version`` given, the state's version is updated.
    """
    n = policy.load_trainable(named_tensors)
    if state is not None and version is not None:
        state.version = int(version)
    return n


def gvu_setup(kwargs: dict, resources: dict) -> GvUState:
    """The scoring policy: ``resources["policy"]`` (the reward actor's), else one loaded / built from kwargs."""
    policy = resources.get("policy")
    if policy is None:
        from policy.config import PolicyConfig
        from policy.model import UnifiedPolicy

        if kwargs.get("policy_path"):
            policy = UnifiedPolicy.from_pretrained(kwargs["policy_path"])
        elif kwargs.get("policy_config") is not None:
            policy = UnifiedPolicy.from_config(PolicyConfig(**kwargs["policy_config"]))
        else:
            raise ValueError("gvu reward needs resources['policy'] or kwargs 'policy_path' / 'policy_config'")
        resources["policy"] = policy
    policy.eval()
    return GvUState(policy=policy, instruction=str(kwargs.get("instruction", INSTRUCTION)),
                    max_batch=int(kwargs.get("max_batch", 32)))


def _latent_of(t: Any) -> torch.Tensor | None:
    lat = traj_meta(t).get("generated_latent")
    if lat is None and not isinstance(t, dict) and getattr(t, "images", None):
        lat = t.images[-1].final_latent
    return None if lat is None else torch.as_tensor(lat).float()


@register_reward("gvu", setup=gvu_setup)
def gvu_reward(trajectories: Sequence[Any], ctx: RewardContext) -> list[float]:
    """GvU reward per trajectory; NaN where the latent or the description is missing."""
    st: GvUState = ctx.state if ctx.state is not None else gvu_setup(ctx.kwargs, ctx.resources)
    out = [math.nan] * len(trajectories)
    idx, lats, descs = [], [], []
    for i, t in enumerate(trajectories):
        lat, desc = _latent_of(t), traj_meta(t).get("prompt_text")
        if lat is None or not desc:
            continue
        idx.append(i)
        lats.append(lat)
        descs.append(str(desc))
    if idx:
        scores = gvu_scores(st.policy, torch.stack(lats), descs, instruction=st.instruction, max_batch=st.max_batch)
        for j, i in enumerate(idx):
            out[i] = float(scores[j])
    return out
