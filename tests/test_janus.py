"""policy/janus.py: tiny Janus (random init, no download), image-token sampling with behaviour log-probs,
teacher-forced recomputation, GRPO through the image tokens, VQ decode."""

from __future__ import annotations

import pytest
import torch

from learner.losses import text_policy_loss
from policy.janus import JanusPolicy, text_image_sequence

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def janus() -> JanusPolicy:
    return JanusPolicy.from_tiny(seed=0)


def _prompts(j: JanusPolicy) -> list[list[int]]:
    return [j.generation_prompt("a red circle"), j.generation_prompt("two blue squares on the left")]


def _sequences(j: JanusPolicy, prompts, codes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded joint sequences (prompt + image tokens), attention and loss masks."""
    rows = [text_image_sequence(j, p, c) for p, c in zip(prompts, codes)]
    width = max(r[0].shape[0] for r in rows)
    ids = torch.full((len(rows), width), j.token_ids["pad"], dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (r, m) in enumerate(rows):
        ids[i, : r.shape[0]], attn[i, : r.shape[0]], mask[i, : r.shape[0]] = r, 1, m
    return ids, attn, mask


def test_tiny_janus_builds_from_config(janus):
    cfg = janus.model.config
    assert cfg.text_config.vocab_size == len(janus.tokenizer) == janus.image_offset
    assert janus.n_image_tokens == 16 and janus.codebook_size == 64
    assert cfg.image_token_id == janus.token_ids["img"]
    assert not any(p.requires_grad for p in janus.model.model.vqmodel.parameters())
    again = JanusPolicy.from_tiny(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(janus.state_dict().values(), again.state_dict().values()))


def test_sampled_logprobs_match_teacher_forced(janus):
    prompts = _prompts(janus)
    g = torch.Generator().manual_seed(0)
    codes, logp = janus.sample_image_tokens(prompts, janus.n_image_tokens, g, temperature=1.0)
    assert codes.shape == (2, janus.n_image_tokens) and logp.shape == codes.shape
    assert codes.min() >= 0 and codes.max() < janus.codebook_size
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    ids, attn, mask = _sequences(janus, prompts, codes)
    with torch.no_grad():
        tf, _ = janus.token_logprobs(ids, attn)
    assert torch.allclose(tf[mask].view(2, -1), logp, atol=1e-4)
    # temperature scales both sides the same way
    codes_t, logp_t = janus.sample_image_tokens(prompts, 5, torch.Generator().manual_seed(1), temperature=0.7)
    ids_t, attn_t, mask_t = _sequences(janus, prompts, codes_t)
    with torch.no_grad():
        tf_t, _ = janus.token_logprobs(ids_t, attn_t, temperature=0.7)
    assert torch.allclose(tf_t[mask_t].view(2, -1), logp_t, atol=1e-4)
    # same generator seed, same codes
    codes2, _ = janus.sample_image_tokens(prompts, janus.n_image_tokens, torch.Generator().manual_seed(0))
    assert torch.equal(codes, codes2)


def test_text_logprobs_and_understanding_path(janus):
    tok = janus.tokenizer
    text = tok.encode("\nwhat colour is the circle?\n", add_special_tokens=False)
    n_feat = (16 // 4) ** 2
    ids = torch.tensor([[janus.token_ids["img_start"]] + [janus.token_ids["img"]] * n_feat + text])
    attn = torch.ones_like(ids)
    with torch.no_grad():
        lp, hidden = janus.token_logprobs(ids, attn, pixel_values=torch.rand(1, 3, 16, 16))
        ref = torch.log_softmax(janus.model.lm_head(hidden[:, :-1]).float(), -1)
    want = ref.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(lp[:, 1:], want, atol=1e-5) and lp[0, 0] == 0


def test_grpo_text_loss_trains_generation_head(janus):
    j = JanusPolicy.from_tiny(seed=0).train()
    prompts = _prompts(j)
    codes, old = j.sample_image_tokens(prompts, 6, torch.Generator().manual_seed(3))
    ids, attn, mask = _sequences(j, prompts, codes)
    old_full = torch.zeros(ids.shape)
    old_full[mask] = old.flatten()
    logp, _ = j.token_logprobs(ids, attn)
    loss, metrics = text_policy_loss(logp, old_full, torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    head = j.model.model.generation_head
    assert head.vision_head.weight.grad is not None and head.vision_head.weight.grad.abs().sum() > 0
    assert j.model.model.generation_embeddings.weight.grad.abs().sum() > 0
    assert abs(metrics["ratio_mean"] - 1.0) < 1e-3  # on-policy: rho = 1


def test_decode_image_tokens(janus):
    codes = torch.randint(0, janus.codebook_size, (3, janus.n_image_tokens))
    with torch.no_grad():
        px = janus.decode_image_tokens(codes)
    assert px.shape == (3, 3, 8, 8) and px.dtype == torch.float32
    assert 0 <= px.min() and px.max() <= 1
    with pytest.raises(ValueError):
        janus.decode_image_tokens(codes[:, :5])


def test_weights_roundtrip(janus):
    other = JanusPolicy.from_tiny(seed=1)
    sd = janus.trainable_state_dict()
    assert not any(k.startswith("model.model.vqmodel.") for k in sd)
    assert other.load_trainable(sd.items()) == len(sd)
    assert all(torch.equal(v, other.trainable_state_dict()[k]) for k, v in sd.items())
    with pytest.raises(KeyError):
        other.load_trainable({"nope": torch.zeros(1)})


def test_both_policy_classes_implement_the_policy_protocol(janus):
    from policy.config import PolicyConfig
    from policy.factory import Policy, build_policy
    from policy.model import UnifiedPolicy
    from policy.protocol import Policy as ProtocolPolicy

    assert Policy is ProtocolPolicy
    unified = build_policy(PolicyConfig(seed=0))
    assert isinstance(unified, UnifiedPolicy)
    for p in (unified, janus):
        assert isinstance(p, Policy), type(p).__name__
        h = torch.zeros(2, 3, p.lm_config.hidden_size)
        assert p.text_logits(h).shape == (2, 3, len(p.tokenizer))  # the text head: text vocabulary only
        assert p.lm_config._attn_implementation
    assert not isinstance(object(), Policy)
