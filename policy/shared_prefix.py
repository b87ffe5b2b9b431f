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
    """How the rows of a right-padded batch share prompts. Worked out on the CPU once; the forward
    then needs no device-to-host round trip (tensors live on the batch's device)."""

    reps: torch.Tensor  # (U,) long: the row whose prefix each distinct prompt is computed from
    group: torch.Tensor  # (B,) long: the distinct prompt each row continues (an index into reps)
    prefix_len: torch.Tensor  # (B,) long: tokens before the row's first sampled token
    completion_len: torch.Tensor  # (B,) long: the row's tokens after its prefix
    prefix_slot_index: torch.Tensor  # which of the batch's slot latents the prefixes hold, in order
    completion_slot_index: torch.Tensor  # which the completions hold, in order
    prefix_width: int  # P: the longest prefix
    completion_width: int  # C: the longest completion (>= 1)

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
    dev = input_ids.device
    ids, loss, latents, attn = input_ids.cpu(), loss_mask.cpu(), slot_latents.cpu(), attention_mask.cpu().long()
    length = attn.sum(1)
    if not torch.equal(attn, (torch.arange(t)[None, :] < length[:, None]).long()):
        return None  # not right-padded: the completion positions below assume each row starts at 0
    prefix_len = torch.where(loss.any(1), loss.long().argmax(1), length).clamp(min=1)
    in_prefix = torch.arange(t)[None, :] < prefix_len[:, None]
    prefix_slots = ((ids == img_id) & in_prefix).sum(1) // max(1, n_image_tokens)
    counts = slot_counts.cpu().long()
    offset = torch.cumsum(counts, 0) - counts
    rows, plen, nslot, off = ids.tolist(), prefix_len.tolist(), prefix_slots.tolist(), offset.tolist()
    reps: list[int] = []
    group: list[int] = []
    by_tokens: dict[tuple[int, ...], list[int]] = {}
    for i in range(b):
        candidates = by_tokens.setdefault(tuple(rows[i][: plen[i]]), [])
        mine = latents[off[i] : off[i] + nslot[i]]
        for u in candidates:  # same tokens: the same prompt only if its image latents are equal too
            r = reps[u]
            if torch.equal(mine, latents[off[r] : off[r] + nslot[r]]):
                group.append(u)
                break
        else:
            candidates.append(len(reps))
            group.append(len(reps))
            reps.append(i)
    if len(reps) == b:
        return None
    p_slots = [k for r in reps for k in range(off[r], off[r] + nslot[r])]
    c_slots = [k for i in range(b) for k in range(off[i] + nslot[i], off[i] + int(counts[i]))]
    completion_len = (length - prefix_len).clamp(min=0)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
    return PrefixPlan(as_long(reps), as_long(group), prefix_len.to(dev), completion_len.to(dev), as_long(p_slots),
                      as_long(c_slots), int(prefix_len[reps].max()), max(1, int(completion_len.max())))


def lm_hidden_shared_prefix(
    policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, slot_latents: torch.Tensor, plan: PrefixPlan
) -> torch.Tensor:
    """The last hidden states (B,T,H) of ``policy.lm_forward(input_ids, attention_mask, slot_latents)``
    with each distinct prompt computed once (see the module docstring for the equations)."""
    b, t = input_ids.shape
    pad, p, c = policy.token_ids["pad"], plan.prefix_width, plan.completion_width
    ar = torch.arange(t, device=input_ids.device)
    # prefix pass: the U distinct prompts, right-padded to P
    p_valid = ar[None, :p] < plan.prefix_len[plan.reps][:, None]
    p_ids = torch.where(p_valid, input_ids[plan.reps, :p], pad)
    p_attn = (p_valid & attention_mask[plan.reps, :p].bool()).long()
    p_embeds = policy.embed(p_ids, slot_latents[plan.prefix_slot_index])
    _, p_hidden, cache = policy.lm_step(p_embeds, p_attn, use_cache=True, head=False)
    # completion pass: every row's tokens after its prefix, attending to its prompt's cache
    src = plan.prefix_len[:, None] + ar[None, :c]  # the completion's positions in the full row
    c_valid = ar[None, :c] < plan.completion_len[:, None]
    c_ids = torch.where(c_valid, input_ids.gather(1, src.clamp(max=t - 1)), pad)
    cache.batch_select_indices(plan.group)
    c_attn = torch.cat([p_attn[plan.group], c_valid.long()], 1)
    _, c_hidden, _ = policy.lm_step(policy.embed(c_ids, slot_latents[plan.completion_slot_index]), c_attn,
                                    position_ids=src, use_cache=False, past_key_values=cache, head=False)
    # full rows: position s < p_i from the prompt, else from the completion (padding reads any valid row)
    index = torch.where(ar[None, :] < plan.prefix_len[:, None], ar[None, :], p + ar[None, :] - plan.prefix_len[:, None])
    index = index.clamp(max=p + c - 1)
    both = torch.cat([p_hidden[plan.group], c_hidden], 1)
    return both.gather(1, index[..., None].expand(-1, -1, both.shape[-1]))
