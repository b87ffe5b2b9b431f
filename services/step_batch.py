"""One GRPO step's training batch from its scored trajectories: what cannot train is dropped and counted (NaN
rewards, stale trajectories, groups without signal), and each kept trajectory gets its advantages.

Per group g (the G samples of one prompt), with r_i the total reward (the weighted ``applies_to: trajectory``
components) and q_ij the value of a component j with ``applies_to: denoising`` and weight w_j:

    A_i     = (r_i - mean_g r) / (std_g r + eps)                                  text tokens and denoising steps
    A_img,i = A_i + sum_j w_j (q_ij - mean_g' q_j) / (std_g' q_j + eps)          the denoising steps alone

g' being the members of g that generated an image (the others have no denoising steps), and a term 0 where g'
has fewer than two members or equal values (``algorithm.adv_scale: none`` leaves out the division). Denoising
components enter only while ``algorithm.lambda_img`` > 0. A group whose totals are all equal carries no text
signal: ``zero_variance: drop`` drops it unless its denoising term has signal, and then its text tokens are
masked out of the loss (the text update is the one without denoising rewards).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from learner.advantage import group_advantages, zero_variance_groups
from learner.batch import TrainBatch, collate
from policy.trajectory import Trajectory
from services.config import RunConfig


class StepBatch(NamedTuple):
    kept: list[Trajectory]
    advantages: torch.Tensor  # (B,) A_i of each kept trajectory
    image_advantages: torch.Tensor | None  # (B,) A_img,i; None without denoising rewards (then A_i)
    metrics: dict[str, float]

    def collate(self, pad_id: int) -> TrainBatch:
        return collate(self.kept, self.advantages, pad_id, self.image_advantages)


def denoising_weights(cfg: RunConfig) -> dict[str, float]:
    """``{component: w_j}`` of the rewards that enter the denoising steps' advantage alone ({} at lambda_img 0)."""
    if cfg.algorithm.lambda_img <= 0:
        return {}
    return {c.name: c.weight for c in cfg.reward.components if c.applies_to == "denoising" and c.weight}


def _denoising_term(values: dict[str, list[float]], members: list[int], generated: list[bool], scale: str
                    ) -> torch.Tensor:
    """sum_j w_j (q_ij - mean_g' q_j) / (std_g' q_j + eps) over ``members`` (0 for those that did not generate)."""
    term = torch.zeros(len(members))
    idx = [k for k, i in enumerate(members) if generated[i]]
    for w, vals in values.values():
        q = torch.tensor([vals[members[k]] for k in idx], dtype=torch.float32)
        keep = torch.isfinite(q)
        if int(keep.sum()) < 2 or bool(zero_variance_groups(q[keep], int(keep.sum()))[0]):
            continue
        sub = torch.tensor(idx)[keep]
        term[sub] += w * group_advantages(q[keep], int(keep.sum()), scale=scale)
    return term


def assemble(trajs: list[Trajectory], totals, components: dict[str, list[float]], cfg: RunConfig,
             learner_version: int) -> StepBatch:
    """Drop NaN totals and stale trajectories (counted), group advantages, groups without signal (counted)."""
    a = cfg.algorithm
    for t, r in zip(trajs, totals):
        t.reward = float(r)
    den = {k: (w, components[k]) for k, w in denoising_weights(cfg).items() if k in components}
    generated = [bool(t.generated_image) for t in trajs]
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(t.prompt_id, []).append(i)
    kept, advs, img_advs = [], [], []
    n_nan = n_stale = n_zero = n_small = n_image_only = 0
    for members in groups.values():
        fresh = [i for i in members if learner_version - trajs[i].policy_version <= a.max_staleness]
        n_stale += len(members) - len(fresh)
        valid = [i for i in fresh if np.isfinite(trajs[i].reward)]
        n_nan += len(fresh) - len(valid)
        if len(valid) < 2:
            n_small += 1
            continue
        r = torch.tensor([trajs[i].reward for i in valid])
        adv = group_advantages(r, len(valid), scale=a.adv_scale)
        term = _denoising_term(den, valid, generated, a.adv_scale) if den else None
        rows = [trajs[i] for i in valid]
        if bool(zero_variance_groups(r, len(valid))[0]):
            n_zero += 1
            if a.zero_variance == "drop":
                if term is None or not bool(term.any()):
                    continue
                n_image_only += 1  # trained for its denoising steps only: no text tokens in the loss
                rows = [replace(t, loss_mask=torch.zeros_like(t.loss_mask)) for t in rows]
        kept += rows
        advs.append(adv)
        img_advs.append(adv if term is None else adv + term)
    m: dict[str, float] = {}
    for name, vals in components.items():
        v = np.asarray(vals, dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = float(v.mean()), float(v.std())
    tot = np.asarray(totals, dtype=float)
    fin = tot[np.isfinite(tot)]
    m.update({
        "reward/total/mean": float(fin.mean()) if fin.size else float("nan"),
        "reward/total/std": float(fin.std()) if fin.size else float("nan"),
        "reward/nan_dropped": float(n_nan), "rollout/stale_dropped": float(n_stale),
        "rollout/zero_variance_groups": float(n_zero), "rollout/groups_too_small": float(n_small),
        "rollout/trigger_rate": float(np.mean(generated)) if generated else float("nan"),
        "rollout/response_len": float(np.mean([t.response_len for t in trajs])),
        "rollout/version_lag": float(np.mean([learner_version - t.policy_version for t in trajs])),
    })
    if den:
        m["rollout/denoising_only_groups"] = float(n_image_only)
    if "answer" in components:
        m["accuracy"] = m.get("reward/answer/mean", float("nan"))
    empty = torch.zeros(0)
    return StepBatch(kept, torch.cat(advs) if advs else empty,
                     (torch.cat(img_advs) if img_advs else empty) if den else None, m)
