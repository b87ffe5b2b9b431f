"""The learner's LM forward with each group's prompt computed once, its samples packed after it.

The G samples of a GRPO group continue one prompt, and causal attention means the prompt's positions
never see what follows them, so their hidden states are the same in every sample. A padded batch
computes them G times. Here each distinct prompt is laid out once, followed by its samples' completions,
in one packed row, with a block mask: a completion sees the prompt and (causally) itself, never a sibling.

    packed row r      : [ prompt_u | completion_i1 | completion_i2 | ... ]   (one LM pass over R rows)
    positions         : prompt t -> t;  completion i, offset j -> p_i + j     (as in row i of the batch)
    allowed(q, k)     : k <= q  and  (k in the prompt  or  segment(k) == segment(q))
    full row i, t     : packed[r(i), t] if t < p_i  else  packed[r(i), start_i + t - p_i]

This is the padded forward's last hidden states (B,T,H) up to float rounding (the caller applies the LM
head where it needs logits) at every position but each row's last token, which predicts nothing and which
nothing attends to, so it is left out (its state is that of another position), unless the row keeps it
(``keep_last``: an image slot's, or the token a generated image is conditioned on, as UAE's reconstruction is
on the whole caption). Gradients flow back through
the shared prompt (its gradient is the sum over its samples, as in the padded batch). At the benchmark's
shape (8 prompts x 4 samples, 59 prompt + 16 sampled tokens) the LM processes 8 x (59 + 4 x 15) = 952
tokens instead of 32 x 75 = 2400, in one pass (one set of kernel launches, large matmuls; no key/value
cache to index out to the rows).

A packed row holds its prompt and as many of the group's completions as fit in twice the batch's width
(at least one): attention inside a packed row is quadratic in its length, so long completions go to
several rows that each repeat the prompt. A row's prompt is its tokens before the first sampled one
(``loss_mask``) plus the image latents in them; rows share a prompt only when both are equal, so a batch
without repeated prompts falls back to the padded forward, and so does a batch whose prompts hold a
vision-language model's input images (:func:`shared_prefix_off`: its tower features and 3-D rope positions
are not packed; the reason is logged once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()

PROMPT, PAD = -1, -2  # segment ids of prompt positions and padding; completions carry their batch row
BLOCK_MASK_ATTENTION = ("sdpa", "eager")  # LM attention implementations that take a custom 4-D mask


# text models that always build their mask from a 2-D one (no ``{"full_attention": mask}`` mapping)
NO_MASK_MAPPING = ("qwen3_vl_text",)


def takes_block_mask(config, implementations: tuple[str, ...] = BLOCK_MASK_ATTENTION) -> bool:
    """Whether an LM with this config takes a prepared 4-D mask (``{"full_attention": mask}``): one of
    ``implementations``, every layer full attention (sliding-window layers would need their own), and a text
    model that accepts the mapping (not ``NO_MASK_MAPPING``)."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (getattr(config, "_attn_implementation", None) in implementations and types == {"full_attention"}
            and getattr(config, "model_type", None) not in NO_MASK_MAPPING)


def shared_prefix_off(vision_images: torch.Tensor) -> str | None:
    """Why a batch takes the padded forward although the packed one could run, or None: a batch holding a
    VLM's input images (``vision_images`` (M, H, W, 3), M > 0). Logged at WARNING once per process."""
    if vision_images.shape[0] == 0:
        return None
    reason = ("shared-prefix learner forward off for batches with vision-language input images: the VLM's tower "
              "features and 3-D rope positions are not packed; the padded forward computes each prompt per sample")
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.warning(reason)
    return reason


@dataclass(frozen=True)
class PrefixPlan:
    """The packed layout of a right-padded batch (B, T) as R rows of width L. Worked out on the CPU once;
    the forward then needs no device-to-host round trip (tensors live on the batch's device)."""

    group: torch.Tensor  # (B,) long: the distinct prompt each row continues
    token_index: torch.Tensor  # (R, L) long: flat index into the batch's (B*T) tokens
    segment: torch.Tensor  # (R, L) long: PROMPT, PAD, or the batch row whose completion is there
    positions: torch.Tensor  # (R, L) long: the position the token has in its batch row
    slot_index: torch.Tensor  # (S,) long: the batch's slot latents in packed order
    out_index: torch.Tensor  # (B, T) long: flat index into the packed (R*L) positions, per batch position

    @property
    def num_prompts(self) -> int:
        return int(self.group.max()) + 1

    @property
    def num_rows(self) -> int:
        return int(self.segment.shape[0])


def _group_rows(rows: list[list[int]], plen: list[int], latents: torch.Tensor, off: list[int],
                nslot: list[int]) -> tuple[list[int], list[int]]:
    """(reps, group): the row each distinct prompt is read from, and which one each row continues."""
    reps: list[int] = []
    group: list[int] = []
    by_tokens: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(rows)):
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
    return reps, group


def plan_shared_prefix(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    slot_counts: torch.Tensor,
    slot_latents: torch.Tensor,
    img_id: int,
    n_image_tokens: int,
    keep_last: torch.Tensor | None = None,
) -> PrefixPlan | None:
    """Group rows by prompt (same tokens before the first sampled one, same image latents there) and pack
    each group; None when no two rows share one (nothing to save) or the batch is not right-padded.
    ``keep_last`` (B,) bool: rows whose last token's hidden state is needed (besides image slots')."""
    b, t = input_ids.shape
    if b < 2:
        return None
    ids, loss, latents, attn = input_ids.cpu(), loss_mask.cpu(), slot_latents.cpu(), attention_mask.cpu().long()
    length = attn.sum(1)
    if not torch.equal(attn, (torch.arange(t)[None, :] < length[:, None]).long()):
        return None  # not right-padded: the positions below assume each row starts at 0
    prefix_len = torch.where(loss.any(1), loss.long().argmax(1), length).clamp(min=1)
    in_prefix = torch.arange(t)[None, :] < prefix_len[:, None]
    prefix_slots = ((ids == img_id) & in_prefix).sum(1) // max(1, n_image_tokens)
    counts = slot_counts.cpu().long()
    offset = torch.cumsum(counts, 0) - counts
    plen, nslot, off = prefix_len.tolist(), prefix_slots.tolist(), offset.tolist()
    # a row's last token predicts nothing and nothing attends to it: left out (unless it is an image slot's or
    # the row keeps it)
    last = ids.gather(1, (length - 1).clamp(min=0)[:, None]).squeeze(1)
    keep = torch.zeros(b, dtype=torch.bool) if keep_last is None else keep_last.cpu().bool()
    clen = (length - prefix_len - ((last != img_id) & ~keep).long()).clamp(min=0).tolist()
    reps, group = _group_rows(ids.tolist(), plen, latents, off, nslot)
    if len(reps) == b:
        return None
    members: list[list[int]] = [[] for _ in reps]
    for i, u in enumerate(group):
        members[u].append(i)
    budget = 2 * t
    packed: list[tuple[int, list[int]]] = []  # (prompt row, completion rows)
    for u, rows in enumerate(members):
        r, used = reps[u], plen[reps[u]]
        packed.append((r, []))
        for i in rows:
            if packed[-1][1] and used + clen[i] > budget:
                packed.append((r, []))
                used = plen[r]
            packed[-1][1].append(i)
            used += clen[i]
    # each packed row as flat lists, then one tensor per field
    tok, seg, pos, slots = [], [], [], []
    out, row_of = [0] * (b * t), [0] * b  # per batch position: its place in its packed row; that row
    for k, (r, rows) in enumerate(packed):
        p = plen[r]
        tok.append([r * t + j for j in range(p)])
        seg.append([PROMPT] * p)
        pos.append(list(range(p)))
        slots += range(off[r], off[r] + nslot[r])
        for i in rows:
            start, n = len(tok[-1]), clen[i]
            tok[-1] += range(i * t + p, i * t + p + n)
            seg[-1] += [i] * n
            pos[-1] += range(p, p + n)
            slots += range(off[i] + nslot[i], off[i] + int(counts[i]))
            out[i * t : i * t + p + n] = [*range(p), *range(start, start + n)]
            row_of[i] = k
    width = max(len(x) for x in tok)
    pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
    out_t = torch.tensor(out, dtype=torch.long).view(b, t) + width * torch.tensor(row_of)[:, None]
    dev = input_ids.device
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
    return PrefixPlan(as_long(group), as_long(pad(tok, 0)), as_long(pad(seg, PAD)), as_long(pad(pos, 0)),
                      as_long(slots), out_t.to(dev))


def packed_mask(plan: PrefixPlan, attn_implementation: str) -> dict:
    """The block mask of the packed rows as the LM's attention takes it: boolean (allowed) for SDPA,
    additive for eager attention (``BLOCK_MASK_ATTENTION``; flash attention takes no custom mask)."""
    seg = plan.segment
    width = seg.shape[1]
    ar = torch.arange(width, device=seg.device)
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = (ar[None, None, :] <= ar[None, :, None]) & (k != PAD) & ((k == PROMPT) | (k == q))
    allowed = (allowed | torch.eye(width, dtype=torch.bool, device=seg.device))[:, None]  # padding sees itself
    if attn_implementation == "sdpa":
        return {"full_attention": allowed}
    if attn_implementation == "eager":
        return {"full_attention": torch.zeros(allowed.shape, device=seg.device).masked_fill(~allowed, float("-inf"))}
    raise ValueError(f"shared prefix: attention {attn_implementation!r} takes no block mask ({BLOCK_MASK_ATTENTION})")


def lm_hidden_shared_prefix(
    policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, slot_latents: torch.Tensor, plan: PrefixPlan
) -> torch.Tensor:
    """The last hidden states (B,T,H) of ``policy.lm_forward(input_ids, attention_mask, slot_latents)``
    with each distinct prompt computed once (see the module docstring for the equations)."""
    mask = packed_mask(plan, policy.lm.config._attn_implementation)
    ids = torch.where(plan.segment != PAD, input_ids.reshape(-1)[plan.token_index], policy.token_ids["pad"])
    embeds = policy.embed(ids, slot_latents[plan.slot_index])
    _, hidden, _ = policy.lm_step(embeds, mask, position_ids=plan.positions, use_cache=False, head=False)
    return hidden.reshape(-1, hidden.shape[-1])[plan.out_index]
