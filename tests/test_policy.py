"""policy/: config, tokenizer, UnifiedPolicy (tiny, CPU, random init)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from policy.config import PolicyConfig
from policy.model import UnifiedPolicy
from policy.tokenizer import SPECIAL, build_tiny_tokenizer, load_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def policy() -> UnifiedPolicy:
    return UnifiedPolicy.from_config(PolicyConfig(seed=0))


def _sequence(policy: UnifiedPolicy, prefix: str, suffix: str, images: int = 1) -> list[int]:
    tok = policy.tokenizer
    ids = tok.encode(prefix, add_special_tokens=False)
    for _ in range(images):
        ids += policy.image_placeholder_ids()
    return ids + tok.encode(suffix, add_special_tokens=False)


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def _batch(policy: UnifiedPolicy, side: str):
    rows = [
        _sequence(policy, "What colour is the circle?", " <answer>A</answer><|endoftext|>"),
        _sequence(policy, "How many?", " two squares <answer>B</answer>"),
        _sequence(policy, "Describe", " a big red star on a blue square", images=0),
    ]
    return _pad(rows, policy.token_ids["pad"], side), rows


# ---- config ----------------------------------------------------------------------------------


def test_config_unknown_key_names_field():
    with pytest.raises(ValidationError, match="lm_pth"):
        PolicyConfig(lm_pth="/x")


def test_real_preset_validates_without_weights():
    cfg = PolicyConfig.real_clear()
    assert cfg.lm_path.endswith("Qwen2.5-7B-Instruct") and cfg.dtype == "bfloat16"
    assert PolicyConfig.real_uae().freeze_generator
    PolicyConfig.model_validate(cfg.model_dump())  # round-trips through plain data
    if not Path(cfg.lm_path).exists():
        with pytest.raises(FileNotFoundError, match="model.lm_path"):
            cfg.check_paths()


def test_missing_lm_path_raises_naming_field(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"model\.lm_path: .*nope does not exist"):
        UnifiedPolicy.from_config(PolicyConfig(lm_path=missing))


def test_unknown_tiny_override_names_field():
    with pytest.raises(ValueError, match=r"model\.generator_tiny.*bogus"):
        UnifiedPolicy.from_config(PolicyConfig(generator_tiny={"bogus": 1}))


# ---- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_specials(tmp_path):
    tok = build_tiny_tokenizer()
    assert tok.get_vocab() == build_tiny_tokenizer().get_vocab()  # deterministic
    text = "What colour is the star? <img_start><img><img><img_end> <gen> <answer>C</answer><|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for special in [*SPECIAL.values(), "<|endoftext|>", "<|pad|>"]:
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.encode(text, add_special_tokens=False) == ids and len(again) == len(tok)


# ---- model -----------------------------------------------------------------------------------


def test_shapes_and_ids(policy):
    assert policy.latent_shape == (4, 8, 8)
    assert policy.n_image_tokens == 16
    ph = policy.image_placeholder_ids()
    assert len(ph) == 18 and ph[0] == policy.token_ids["img_start"] and ph[-1] == policy.token_ids["img_end"]
    pixels = torch.rand(2, 3, 32, 32)
    z = policy.encode_image(pixels)
    assert z.shape == (2, 4, 8, 8)
    out = policy.decode_latent(z)
    assert out.shape == pixels.shape and 0.0 <= out.min() and out.max() <= 1.0


def test_embed_rejects_wrong_placeholder_count(policy):
    ids = torch.tensor([_sequence(policy, "a", "b", images=2)])
    with pytest.raises(ValueError, match="placeholders"):
        policy.embed(ids, torch.randn(1, *policy.latent_shape))
    with pytest.raises(ValueError, match="placeholders"):
        policy.embed(ids, None)
    assert policy.embed(ids, torch.randn(2, *policy.latent_shape)).shape == (1, ids.shape[1], 64)


def test_left_and_right_padding_agree(policy):
    torch.manual_seed(1)
    latents = torch.randn(2, *policy.latent_shape)
    (ids_l, m_l), rows = _batch(policy, "left")
    (ids_r, m_r), _ = _batch(policy, "right")
    with torch.no_grad():
        lp_l, h_l = policy.token_logprobs(ids_l, m_l, latents)
        lp_r, h_r = policy.token_logprobs(ids_r, m_r, latents)
        t = ids_l.shape[1]
        for i, r in enumerate(rows):
            n = len(r)
            assert torch.isfinite(lp_l[i]).all() and torch.isfinite(lp_r[i]).all()
            torch.testing.assert_close(lp_l[i, t - n :], lp_r[i, :n], atol=1e-5, rtol=0)
            assert lp_r[i, 0] == 0 and lp_l[i, t - n] == 0
            assert (lp_l[i, : t - n] == 0).all() and (lp_r[i, n:] == 0).all()
        # conditioning on the same prefix is the same whatever the padding
        ends_l = torch.tensor([t - len(rows[0]) + 10, t - len(rows[1]) + 6, t])
        ends_r = torch.tensor([10, 6, len(rows[2])])
        e_l, p_l = policy.condition(h_l, ends_l, m_l)
        e_r, p_r = policy.condition(h_r, ends_r, m_r)
        torch.testing.assert_close(e_l, e_r, atol=1e-5, rtol=0)
        torch.testing.assert_close(p_l, p_r, atol=1e-5, rtol=0)


def test_incremental_decoding_matches_full_forward(policy):
    (ids, mask), _ = _batch(policy, "left")
    latents = torch.randn(2, *policy.latent_shape)
    with torch.no_grad():
        full_logits, _ = policy.lm_forward(ids, mask, latents)
        emb = policy.embed(ids, latents)
        logits, _, past = policy.lm_step(emb[:, :-2], mask[:, :-2])
        logits2, _, past = policy.lm_step(emb[:, -2:-1], mask[:, :-1], past_key_values=past)
        logits3, _, _ = policy.lm_step(emb[:, -1:], mask, past_key_values=past)
    torch.testing.assert_close(logits2[:, -1], full_logits[:, -2], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits3[:, -1], full_logits[:, -1], atol=1e-5, rtol=0)


def test_backward_reaches_trainable_parts_not_vae(policy):
    policy.zero_grad(set_to_none=True)
    policy.train()
    try:
        ids = torch.tensor([_sequence(policy, "Make a red circle", " <gen>")])
        mask = torch.ones_like(ids)
        latents = torch.randn(1, *policy.latent_shape)
        logp, hidden = policy.token_logprobs(ids, mask, latents)
        enc, pooled = policy.condition(hidden, torch.tensor([ids.shape[1]]))
        x0, noise = torch.randn(1, *policy.latent_shape), torch.randn(1, *policy.latent_shape)
        sigma = torch.tensor([0.7])
        xt = (1 - sigma) * x0 + sigma * noise
        v = policy.velocity(xt, sigma, enc, pooled)
        loss = -logp.sum() + ((v - (noise - x0)) ** 2).mean()
        loss.backward()
        assert not policy.vae.training
    finally:
        policy.eval()

    def has_grad(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    for name in ("lm", "bridge", "connector", "generator"):
        assert has_grad(getattr(policy, name)), name
    assert all(p.grad is None and not p.requires_grad for p in policy.vae.parameters())
    policy.zero_grad(set_to_none=True)


def test_trainable_state_dict_and_load(policy):
    sd = policy.trainable_state_dict()
    assert sd and not any(k.startswith("vae.") for k in sd)
    assert any(k.startswith("bridge.") for k in sd) and any(k.startswith("generator.") for k in sd)
    other = UnifiedPolicy.from_config(PolicyConfig(seed=1))
    assert not torch.equal(other.bridge.pos, policy.bridge.pos)
    assert other.load_trainable(((k, v.clone()) for k, v in sd.items())) == len(sd)
    assert torch.equal(other.bridge.pos, policy.bridge.pos)
    with pytest.raises(KeyError):
        other.load_trainable({"vae.encoder.conv_in.weight": torch.zeros(1)})
    frozen = UnifiedPolicy.from_config(PolicyConfig(freeze_generator=True))
    assert not any(k.startswith("generator.") for k in frozen.trainable_state_dict())
    assert not any(p.requires_grad for p in frozen.generator.parameters())


def test_from_config_is_deterministic(policy):
    again = UnifiedPolicy.from_config(PolicyConfig(seed=0))
    a, b = policy.trainable_state_dict(), again.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_roundtrip(policy, tmp_path):
    policy.save_pretrained(tmp_path / "ckpt")
    files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert {"lm", "generator", "vae"} <= {p.parent.name for p in files if p.suffix == ".safetensors"}
    loaded = UnifiedPolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.token_ids == policy.token_ids
    (ids, mask), _ = _batch(policy, "right")
    torch.manual_seed(2)
    latents = torch.randn(2, *policy.latent_shape)
    sigma = torch.tensor([0.3, 0.3, 0.9])
    x = torch.randn(3, *policy.latent_shape)
    with torch.no_grad():
        outs = []
        for model in (policy, loaded):
            lp, h = model.token_logprobs(ids, mask, latents)
            enc, pooled = model.condition(h, torch.tensor([8, 8, 8]), mask)
            outs.append((lp, model.velocity(x, sigma, enc, pooled), model.decode_latent(latents)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_bfloat16_roundtrip_keeps_logprobs(tmp_path):
    model = UnifiedPolicy.from_config(PolicyConfig(dtype="bfloat16"))
    assert model.lm.dtype == torch.bfloat16 and model.lm.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.tensor([_sequence(model, "a red", " <gen>")])
    mask = torch.ones_like(ids)
    latents = torch.randn(1, *model.latent_shape)
    model.save_pretrained(tmp_path)
    loaded = UnifiedPolicy.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(
            model.token_logprobs(ids, mask, latents)[0], loaded.token_logprobs(ids, mask, latents)[0]
        )
