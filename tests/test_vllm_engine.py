"""vLLM text engine: the CPU checks (clear ImportError, weight names) and GPU checks marked ``gpu``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_gpu = pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and CUDA")


@pytest.fixture(scope="module")
def tiny_policy():
    from policy.config import PolicyConfig
    from policy.model import UnifiedPolicy

    return UnifiedPolicy.from_config(PolicyConfig())


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_make_engine_vllm_without_vllm_says_install_extra(tiny_policy) -> None:
    from rollout.worker import make_engine

    with pytest.raises(ImportError, match=r"`vllm` extra") as info:
        make_engine("vllm", tiny_policy)
    assert "unigrpo[vllm]" in str(info.value)


def test_module_imports_without_vllm() -> None:
    import rollout.vllm_engine as m

    assert hasattr(m, "VLLMTextEngine")


def test_weight_names_map_lm_prefix(tiny_policy) -> None:
    from rollout.vllm_engine import vllm_weight_names

    named = list(tiny_policy.trainable_state_dict().items())
    mapped = dict(vllm_weight_names(named))
    lm_names = set(tiny_policy.lm.state_dict())
    assert set(mapped) == lm_names  # exactly the LM's HF checkpoint names, nothing else
    assert "model.embed_tokens.weight" in mapped and "lm_head.weight" in mapped


# ------------------------------------------------------------------------------------------ GPU
@pytest.fixture(scope="module")
def engine(tiny_policy):
    if not (HAS_VLLM and torch.cuda.is_available()):
        pytest.skip("needs vLLM and CUDA")
    from rollout.vllm_engine import VLLMTextEngine

    policy = tiny_policy.to("cuda")
    eng = VLLMTextEngine(policy, gpu_memory_utilization=0.2, enforce_eager=True)
    yield eng
    eng.close()


def _requests(policy, n: int = 3, max_new: int = 12):
    from policy.prompting import encode_prompt
    from rollout.engine import TextRequest

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = encode_prompt(policy.tokenizer, f"question {i}: what color?", policy.n_image_tokens, with_image=True)
        lat = torch.randn((1, *policy.latent_shape), generator=g)
        out.append(TextRequest(ids, lat, max_new))
    return out


@pytest.mark.gpu
@needs_gpu
def test_vllm_generate_logprobs_match_policy(engine) -> None:
    from policy.prompting import unsampleable_ids
    from rollout.engine import SamplingSettings

    p = engine.policy
    reqs = _requests(p)
    s = SamplingSettings(temperature=0.8, top_p=1.0, stop_ids=(p.token_ids["eos"], p.token_ids["gen"]))
    outs = engine.generate(reqs, s, torch.Generator().manual_seed(1))
    banned = set(unsampleable_ids(p.token_ids))
    for r, c in zip(reqs, outs):
        assert 0 < len(c.token_ids) <= r.max_new_tokens
        assert len(c.logprobs) == len(c.token_ids)
        assert not banned & set(c.token_ids)
        assert c.finish == ("stop" if c.token_ids[-1] in s.stop_ids else "length")
        ref = engine.policy_logprobs(r, c.token_ids, s.temperature)  # HF recomputation (the learner's)
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(ref), atol=2e-3)


@pytest.mark.gpu
@needs_gpu
def test_vllm_seeded_and_top_p_recompute(engine) -> None:
    from rollout.engine import SamplingSettings

    p = engine.policy
    reqs = _requests(p, n=2)
    s = SamplingSettings(temperature=1.0, top_p=0.9, stop_ids=(p.token_ids["eos"],))
    a = engine.generate(reqs, s, torch.Generator().manual_seed(5))
    b = engine.generate(reqs, s, torch.Generator().manual_seed(5))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for r, c in zip(reqs, a):  # top_p < 1: log-probs are the untruncated ones (recomputed)
        assert c.logprobs == pytest.approx(engine.policy_logprobs(r, c.token_ids, 1.0), abs=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_vllm_load_weights_changes_samples(engine) -> None:
    from rollout.engine import SamplingSettings

    p = engine.policy
    reqs = _requests(p, n=2, max_new=8)
    s = SamplingSettings(temperature=1.0, stop_ids=())
    state = {k: v.clone() for k, v in p.trainable_state_dict().items()}
    new = dict(state)
    new["lm.lm_head.weight"] = state["lm.lm_head.weight"] * 3.0  # sharper distribution
    before = engine.generate(reqs, s, torch.Generator().manual_seed(2))
    engine.load_weights(new.items())
    outs = engine.generate(reqs, s, torch.Generator().manual_seed(2))
    for r, c in zip(reqs, outs):  # vLLM and the policy agree after the sync
        assert c.logprobs == pytest.approx(engine.policy_logprobs(r, c.token_ids, 1.0), abs=2e-3)
    assert [c.logprobs for c in outs] != [c.logprobs for c in before]
    engine.load_weights(state.items())


@pytest.mark.gpu
@needs_gpu
def test_vllm_lora_engine_holds_the_merged_weights() -> None:
    """A LoRA policy: vLLM starts from the merged LM and, after a sync of the adapters, holds the merged
    weights of the adapted layers (handed over as CUDA IPC handles): its log-probs are the policy's."""
    from policy.config import PolicyConfig
    from policy.model import UnifiedPolicy
    from rollout.engine import SamplingSettings
    from rollout.vllm_engine import VLLMTextEngine

    policy = UnifiedPolicy.from_config(PolicyConfig(lora={"enabled": True, "rank": 4})).to("cuda")
    g = torch.Generator().manual_seed(3)

    def move_adapters():
        with torch.no_grad():
            for t in policy.trainable_state_dict().values():
                t.add_(torch.randn(t.shape, generator=g).to(t) * 0.05)

    move_adapters()
    eng = VLLMTextEngine(policy, gpu_memory_utilization=0.2, enforce_eager=True)
    try:
        reqs, s = _requests(policy, n=2, max_new=8), SamplingSettings(temperature=1.0, stop_ids=())
        for _ in range(2):
            outs = eng.generate(reqs, s, torch.Generator().manual_seed(2))
            for r, c in zip(reqs, outs):
                assert c.logprobs == pytest.approx(eng.policy_logprobs(r, c.token_ids, 1.0), abs=2e-3)
            move_adapters()
            eng.load_weights([(k, v.clone()) for k, v in policy.trainable_state_dict().items()])
    finally:
        eng.close()
