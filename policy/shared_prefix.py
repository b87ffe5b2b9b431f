"""The learner's LM forward with each group's prompt computed once.

The G samples of a GRPO group continue one prompt, and causal attention means the prompt's positions
never see what follows them, so their hidden states (and their keys and values) are the same in every
sample. A padded batch computes them G times; here they are computed once per distinct prompt and its
key/value cache is shared by the group's completions:

    prefix forward   : U distinct prompts (U, P)                      -> hidden, cache
    completion pass  : B rows (B, C), attending to cache[group(row)]  -> hidden
    full row i, t    : prefix[group(i), t] if t < p_i else completion[i, t - p_i]

The result has the shape and values (up to float rounding) of the LM's last hidden states on the padded
batch (``UnifiedPolicy.lm_forward``'s second output; the caller applies the LM head where it needs
logits), and gradients flow back through the shared cache (each prompt's gradient is the sum over its
samples, as in the padded batch). At the benchmark's shape (8 prompts x 4 samples, 59 prompt + 16
sampled tokens) the LM processes 8 x 59 + 32 x 16 = 984 tokens instead of 32 x 75 = 2400.

A row's prefix is its tokens before the first sampled one (``loss_mask``) plus the image latents in
them; rows share a prefix only when both are equal, so a batch without repeated prompts (or a prompt
whose image latents differ per sample) simply falls back to the padded forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixPlan:
    """How the rows of a right-padded batch share prompts."""

    reps: torch.Tensor  # (U,) long: the row whose prefix each distinct prompt is computed from
    group: torch.Tensor  # (B,) long: the distinct prompt each row continues (an index into reps)
    prefix_len: torch.Tensor  # (B,) long: tokens before the row's first sampled token
    prefix_slots: torch.Tensor  # (B,) long: image slots among those tokens
    slot_offset: torch.Tensor  # (B,) long: index of the row's first slot in the batch's slot latents
    slot_counts: torch.Tensor  # (B,) long: the row's slots (prefix and completion)

    @property
    def num_prompts(self) -> int:
        return int(self.reps.shape[0])


def plan_shared_prefix(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    slot_counts: torch.Tensor,
    slot_latents: torch.Tensor,
    img_id: int,
    n_image_tokens: int,
) -> PrefixPlan | None:
    """Group rows by prompt (same tokens before the first sampled one, same image latents there); None
    when no two rows share one (nothing to save)."""
    b, t = input_ids.shape
    if b < 2:
        return None
    length = attention_mask.long().sum(1)
    first_sampled = torch.where(loss_mask.any(1), loss_mask.long().argmax(1), length)
    prefix_len = first_sampled.clamp(min=1)
    in_prefix = torch.arange(t, device=input_ids.device)[None, :] < prefix_len[:, None]
    prefix_slots = ((input_ids == img_id) & in_prefix).sum(1) // max(1, n_image_tokens)
    slot_offset = torch.cumsum(slot_counts, 0) - slot_counts
    rows_ids = input_ids.cpu().tolist()
    plen, nslot, off = prefix_len.tolist(), prefix_slots.tolist(), slot_offset.tolist()
    reps: list[int] = []
    group: list[int] = []
    by_tokens: dict[tuple[int, ...], list[int]] = {}
    for i in range(b):
        candidates = by_tokens.setdefault(tuple(rows_ids[i][: plen[i]]), [])
        mine = slot_latents[off[i] : off[i] + nslot[i]]
        for u in candidates:  # same tokens: the same prompt only if its image latents are equal too
            r = reps[u]
            if torch.equal(mine, slot_latents[off[r] : off[r] + nslot[r]]):
                group.append(u)
                break
        else:
            candidates.append(len(reps))
            group.append(len(reps))
            reps.append(i)
    if len(reps) == b:
        return None
    dev = input_ids.device
    return PrefixPlan(torch.tensor(reps, device=dev), torch.tensor(group, device=dev), prefix_len,
                      prefix_slots, slot_offset, slot_counts)


def _slots(slot_latents: torch.Tensor, start: list[int], count: list[int]) -> torch.Tensor:
    parts = [slot_latents[s : s + n] for s, n in zip(start, count, strict=True) if n]
    return torch.cat(parts) if parts else slot_latents[:0]


def lm_hidden_shared_prefix(
    policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, slot_latents: torch.Tensor, plan: PrefixPlan
) -> torch.Tensor:
    """The last hidden states (B,T,H) of ``policy.lm_forward(input_ids, attention_mask, slot_latents)``
    with each distinct prompt computed once (see the module docstring for the equations)."""
    b, t = input_ids.shape
    dev, pad = input_ids.device, policy.token_ids["pad"]
    ar = torch.arange(t, device=dev)
    length = attention_mask.long().sum(1)
    # prefix pass: the U distinct prompts, right-padded to P
    rep_len = plan.prefix_len[plan.reps]
    p = int(rep_len.max())
    p_valid = ar[None, :p] < rep_len[:, None]
    p_ids = torch.where(p_valid, input_ids[plan.reps, :p], pad)
    p_attn = (p_valid & attention_mask[plan.reps, :p].bool()).long()
    reps, off, nslot = plan.reps.tolist(), plan.slot_offset.tolist(), plan.prefix_slots.tolist()
    p_slots = _slots(slot_latents, [off[r] for r in reps], [nslot[r] for r in reps])
    _, p_hidden, cache = policy.lm_step(policy.embed(p_ids, p_slots), p_attn, use_cache=True, head=False)
    # completion pass: every row's tokens after its prefix, attending to its prompt's cache
    c_len = (length - plan.prefix_len).clamp(min=0)
    c = max(1, int(c_len.max()))
    src = plan.prefix_len[:, None] + ar[None, :c]  # the completion's positions in the full row
    c_valid = ar[None, :c] < c_len[:, None]
    c_ids = torch.where(c_valid, input_ids.gather(1, src.clamp(max=t - 1)), pad)
    counts = [n - k for n, k in zip(plan.slot_counts.tolist(), nslot, strict=True)]
    c_slots = _slots(slot_latents, [o + k for o, k in zip(off, nslot, strict=True)], counts)
    cache.batch_select_indices(plan.group)
    c_attn = torch.cat([p_attn[plan.group], c_valid.long()], 1)
    _, c_hidden, _ = policy.lm_step(policy.embed(c_ids, c_slots), c_attn, position_ids=src, use_cache=False,
                                    past_key_values=cache, head=False)
    # full rows: position s < p_i from the prompt, else from the completion (padding reads any valid row)
    index = torch.where(ar[None, :] < plan.prefix_len[:, None], ar[None, :], p + ar[None, :] - plan.prefix_len[:, None])
    index = index.clamp(max=p + c - 1)

    both = torch.cat([p_hidden[plan.group], c_hidden], 1)
    return both.gather(1, index[..., None].expand(-1, -1, both.shape[-1]))
