"""Text engines: one interface, two backends (transformers here, vLLM in ``vllm_engine.py``).

An engine samples continuations of token prompts whose image slots carry bridged latents, and returns
each sampled token's behaviour log-prob under the temperature-scaled policy (what the learner recomputes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from policy.prompting import mask_unsampleable


@dataclass
class TextRequest:
    input_ids: list[int]
    slot_latents: torch.Tensor  # (n_slots, C, h, w); n_slots may be 0
    max_new_tokens: int


@dataclass
class TextCompletion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = "length"  # "stop": the last token is a stop id; "length": the budget ran out


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()


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
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)


class HFTextEngine:
    """Batched sampling with a KV cache on the policy's own transformers LM (CPU or GPU)."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.policy.load_trainable(named_tensors)

    @torch.no_grad()
    def generate(
        self, requests: list[TextRequest], s: SamplingSettings, generator: torch.Generator | None = None
    ) -> list[TextCompletion]:
        if not requests:
            return []
        p = self.policy
        pad = p.token_ids["pad"]
        b, width = len(requests), max(len(r.input_ids) for r in requests)
        ids = torch.full((b, width), pad, dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's next token lands in the last column
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            attn[i, width - len(r.input_ids):] = 1
        latents = torch.cat([r.slot_latents for r in requests]).to(p.device)
        logits, _, cache = p.lm_step(p.embed(ids.to(p.device), latents), attn.to(p.device))
        last = mask_unsampleable(logits[:, -1], p.token_ids)
        out = [TextCompletion() for _ in requests]
        budget = torch.tensor([r.max_new_tokens for r in requests])
        done = budget <= 0
        stops = torch.tensor(list(s.stop_ids) or [-1])
        embed_tokens = p.lm.get_input_embeddings()
        for step in range(int(budget.max())):
            token, lp = sample_token(last, s, generator)
            token, lp = token.cpu(), lp.cpu()
            for i in torch.nonzero(~done).flatten().tolist():
                out[i].token_ids.append(int(token[i]))
                out[i].logprobs.append(float(lp[i]))
            stopped = torch.isin(token, stops) & ~done
            for i in torch.nonzero(stopped).flatten().tolist():
                out[i].finish = "stop"
            newly_done = stopped | (budget <= step + 1)
            alive = ~done
            done = done | newly_done
            if bool(done.all()):
                break
            token = torch.where(alive, token, torch.full_like(token, pad))
            attn = torch.cat([attn, alive.long()[:, None]], dim=1)
            logits, _, cache = p.lm_step(
                embed_tokens(token[:, None].to(p.device)), attn.to(p.device), past_key_values=cache
            )
            last = mask_unsampleable(logits[:, -1], p.token_ids)
        return out


def make_engine(name: str, policy, **kwargs) -> TextEngine:
    """``hf`` (transformers, any device) or ``vllm`` (GPU, the ``vllm`` extra)."""
    if name == "hf":
        return HFTextEngine(policy)
    if name == "vllm":
        from rollout.vllm_engine import VLLMTextEngine

        return VLLMTextEngine(policy, **kwargs)
    raise ValueError(f"rollout.engine: unknown engine {name!r} (hf | vllm)")
