"""Text engines: one interface, two backends (transformers here, vLLM in ``vllm_engine.py``).

An engine samples continuations of token prompts whose image slots carry bridged latents (and, with a
vision-language model, whose ``<|image_pad|>`` runs carry the VLM tower's features of the input images), and returns
each sampled token's behaviour log-prob under the temperature-scaled policy (what the learner recomputes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from policy.prompting import mask_unsampleable
from policy.shared_prefix import takes_block_mask
from policy.vision import empty_images, next_positions, stack_images


@dataclass
class TextRequest:
    input_ids: list[int]
    slot_latents: torch.Tensor  # (n_slots, C, h, w); n_slots may be 0
    max_new_tokens: int
    vision_images: torch.Tensor = field(default_factory=empty_images)  # (m, H, W, 3) uint8: a VLM's inputs


@dataclass
class TextCompletion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = "length"  # "stop": the last token is a stop id; "length": the budget ran out


@dataclass
class SamplingSettings:
    """``banned_ids``: tokens this call never samples (evaluation's forbidden generation bans ``<gen>``);
    log-probs are then under the distribution renormalised without them."""

    temperature: float = 1.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    banned_ids: tuple[int, ...] = ()


def mask_banned(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """logits (..., V) with ``s.banned_ids`` set to -inf (the tensor itself when nothing is banned)."""
    if not s.banned_ids:
        return logits
    return logits.index_fill(-1, logits.new_tensor(s.banned_ids, dtype=torch.long), float("-inf"))


class TextEngine(Protocol):
    def generate(
        self, requests: list[TextRequest], s: SamplingSettings, generator: torch.Generator | None = None
    ) -> list[TextCompletion]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def sample_token(logits: torch.Tensor, s: SamplingSettings, generator: torch.Generator | None):
    """Draw from softmax(logits / T), nucleus-truncated at top_p; returns (token (B,), logp (B,)) with
    logp under the untruncated temperature-scaled distribution. Temperature 0 is greedy."""
    if s.temperature <= 0:  # greedy (evaluation); logp under the untempered distribution
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits.float(), -1).gather(-1, token[:, None]).squeeze(-1)
    logp_all = torch.log_softmax(logits.float() / s.temperature, dim=-1)
    probs = logp_all.exp()
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > s.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    token = draw_index(probs, generator)
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)


def draw_index(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V) (non-negative, unnormalised), on ``probs``' device.

    Where the generator lives with the probabilities (the CPU), ``torch.multinomial``. A GPU policy keeps
    the rollout's CPU generator (a seed gives the same draws on any device): one uniform per row is drawn
    on it and moved, and the index is read off the CDF on the GPU (B numbers cross the bus, not B x V)."""
    if generator is None or probs.device == generator.device:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    u = torch.rand((probs.shape[0],), generator=generator, dtype=torch.float64, device=generator.device)
    return inverse_cdf(probs, u.to(probs.device))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` (B, V), the first index whose CDF exceeds ``u * total`` (``u`` (B,) in [0, 1)),
    computed in float64; never an index without mass."""
    cdf = probs.double().cumsum(-1)
    index = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # the last index with mass
    return torch.minimum(index, last)


def _dedupe(requests: list[TextRequest]) -> tuple[list[int], torch.Tensor]:
    """Indices of the distinct requests (same token ids, same slot-latent and vision-image tensor objects: the
    G copies of a prompt in a group) and, per request, which distinct one it is."""
    first: dict[tuple, int] = {}
    uniq: list[int] = []
    which = []
    for i, r in enumerate(requests):
        key = (tuple(r.input_ids), id(r.slot_latents), id(r.vision_images))
        j = first.get(key)
        if j is None:
            j = first[key] = len(uniq)
            uniq.append(i)
        which.append(j)
    return uniq, torch.tensor(which, dtype=torch.long)


def _sdpa_mask(attn: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean (B, 1, q, K) mask for the last ``q_len`` of K positions: causal and not padding. A query
    that may see nothing (a left-padding position) sees itself, so SDPA yields no NaN there; such
    positions' outputs are never read."""
    k = attn.shape[1]
    allowed = attn.bool()[:, None, None, :]
    if q_len > 1:
        q = torch.arange(k - q_len, k, device=attn.device)[:, None]
        kv = torch.arange(k, device=attn.device)[None, :]
        allowed = (allowed & (kv <= q)) | (kv == q)
    return allowed


class HFTextEngine:
    """Batched sampling with a KV cache on the policy's own transformers LM (CPU or GPU).

    The prompt of a group is prefilled once and its cache shared by the G samples; with SDPA attention
    the engine builds the (causal + padding) mask itself instead of transformers' per-call mask
    construction; tokens and log-probs stay in tensors until the end (no per-token Python loop)."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.policy.load_trainable(named_tensors, share=True)  # received tensors become the weights, no copy

    def _mask(self, attn: torch.Tensor, q_len: int):
        if not takes_block_mask(self.policy.lm_config, ("sdpa",)):
            return attn  # transformers builds it
        return {"full_attention": _sdpa_mask(attn, q_len)}

    def _step(self, embeds: torch.Tensor, attn: torch.Tensor, cache=None, delta: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, extra: dict | None = None):
        """One LM call on the last ``embeds.shape[1]`` positions; ``positions`` default to ``cumsum(mask) - 1``
        (plus a VLM's rope ``delta``)."""
        p = self.policy
        dev_attn = attn.to(p.device)
        if positions is None:
            positions = next_positions(dev_attn, delta, embeds.shape[1])
        logits, _, cache = p.lm_step(embeds, self._mask(dev_attn, embeds.shape[1]), position_ids=positions,
                                     past_key_values=cache, last_only=True, extra=extra)
        return logits[:, -1], cache

    @torch.no_grad()
    def generate(
        self, requests: list[TextRequest], s: SamplingSettings, generator: torch.Generator | None = None
    ) -> list[TextCompletion]:
        if not requests:
            return []
        p = self.policy
        pad = p.token_ids["pad"]
        uniq, which = _dedupe(requests)
        u_reqs = [requests[i] for i in uniq]
        b, width = len(requests), max(len(r.input_ids) for r in requests)
        ids = torch.full((len(u_reqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(u_reqs), width), dtype=torch.long)
        for i, r in enumerate(u_reqs):  # left padding: every row's next token lands in the last column
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            attn[i, width - len(r.input_ids):] = 1
        latents = torch.cat([r.slot_latents for r in u_reqs]).to(p.device)
        inp = p.lm_inputs(ids.to(p.device), attn.to(p.device), latents, stack_images([r.vision_images for r in u_reqs]))
        last, cache = self._step(inp.embeds, attn, positions=inp.position_ids, extra=inp.extra)
        delta = inp.delta  # a VLM's rope delta per row (None: a causal LM)
        if len(u_reqs) < b:  # expand the shared prefill to every sample
            last, attn = last[which.to(last.device)], attn[which]
            delta = None if delta is None else delta[which.to(delta.device)]
            cache.batch_select_indices(which.to(p.device))
        last = mask_banned(mask_unsampleable(last, p.token_ids), s)
        budget = torch.tensor([r.max_new_tokens for r in requests])
        n_max = int(budget.max()) if b else 0
        tokens = torch.full((b, max(n_max, 1)), pad, dtype=torch.long)
        logps = torch.zeros((b, max(n_max, 1)))
        lengths = torch.zeros(b, dtype=torch.long)
        stopped_at_stop = torch.zeros(b, dtype=torch.bool)
        done = budget <= 0
        stops = torch.tensor(list(s.stop_ids) or [-1])
        embed_tokens = p.lm.get_input_embeddings()
        for step in range(n_max):
            token, lp = sample_token(last, s, generator)
            token, lp = token.cpu(), lp.cpu()
            alive = ~done
            tokens[:, step] = torch.where(alive, token, tokens[:, step])
            logps[:, step] = torch.where(alive, lp.float(), logps[:, step])
            lengths += alive.long()
            stopped = torch.isin(token, stops) & alive
            stopped_at_stop |= stopped
            done = done | stopped | (budget <= step + 1)
            if bool(done.all()):
                break
            token = torch.where(alive, token, torch.full_like(token, pad))
            attn = torch.cat([attn, alive.long()[:, None]], dim=1)
            last, cache = self._step(embed_tokens(token[:, None].to(p.device)), attn, cache, delta)
            last = mask_banned(mask_unsampleable(last, p.token_ids), s)
        tok_rows, lp_rows, n_rows = tokens.tolist(), logps.tolist(), lengths.tolist()
        return [TextCompletion(tok_rows[i][: n_rows[i]], lp_rows[i][: n_rows[i]],
                               "stop" if bool(stopped_at_stop[i]) else "length") for i in range(b)]
