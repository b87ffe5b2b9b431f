"""policy/shared_prefix.py: the learner's LM forward with each group's prompt computed once gives the
padded forward's logits, hidden states and gradients (prompts with an input image, completions with a
generated image, prompts of different lengths), and rows share only what is truly the same."""

from __future__ import annotations

import pytest
import torch

from policy.config import PolicyConfig
from policy.model import UnifiedPolicy
from policy.shared_prefix import lm_hidden_shared_prefix, plan_shared_prefix

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def policy() -> UnifiedPolicy:
    return UnifiedPolicy.from_config(PolicyConfig(seed=0))


COMPLETIONS = [(" red", False), (" I will draw it", True), (" blue <answer>A</answer>", False)]


def _rows(policy: UnifiedPolicy, completion_texts=COMPLETIONS):
    """Two prompts (one with an input image) x 3 samples; some completions generate an image.
    Returns right-padded ids, attention mask, loss mask, slot counts and slot latents (row-major)."""
    tok, img = policy.tokenizer, policy.image_placeholder_ids()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    latent = lambda: torch.randn((1, *policy.latent_shape), generator=gen)  # noqa: E731
    prompts = [(enc("What colour is the circle?") + img + enc(" answer:"), latent()), (enc("How many shapes?"), None)]
    completions = [(enc(text), draws) for text, draws in completion_texts]
    rows, sampled, counts, latents = [], [], [], []
    for prompt, prompt_latent in prompts:
        for text, draws in completions:
            tail = text + (img + enc(" so B") if draws else [])
            rows.append(prompt + tail)
            sampled.append([False] * len(prompt) + [tok_id not in img for tok_id in tail])
            row_latents = ([prompt_latent] if prompt_latent is not None else []) + ([latent()] if draws else [])
            counts.append(len(row_latents))
            latents += row_latents
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), policy.token_ids["pad"], dtype=torch.long)
    attn, loss = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, sampled, strict=True)):
        ids[i, : len(r)], attn[i, : len(r)], loss[i, : len(r)] = torch.tensor(r), 1, torch.tensor(m)
    return ids, attn, loss, torch.tensor(counts), torch.cat(latents)


def _plan(policy, ids, attn, loss, counts, latents):
    return plan_shared_prefix(ids, attn, loss, counts, latents, policy.token_ids["img"], policy.n_image_tokens)


def _assert_same_as_padded(policy, ids, attn, latents, plan) -> None:
    """Logits, hidden states and every parameter's gradient of the shared-prefix forward match the padded one
    at every position but each row's last (which predicts nothing: the shared forward leaves it out)."""
    weight = torch.randn(policy.lm.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(ids.device)
    valid = attn.bool() & (torch.arange(attn.shape[1], device=ids.device)[None, :] < attn.sum(1)[:, None] - 1)

    def run(forward):
        policy.zero_grad(set_to_none=True)
        hidden = forward()
        logits = policy.lm.get_output_embeddings()(hidden)
        (logits.log_softmax(-1)[valid].mean() + (hidden[valid] @ weight).mean()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return logits.detach()[valid], hidden.detach()[valid], grads

    padded = run(lambda: policy.lm_forward(ids, attn, latents)[1])
    shared = run(lambda: lm_hidden_shared_prefix(policy, ids, attn, latents, plan))
    torch.testing.assert_close(shared[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], padded[1], rtol=1e-5, atol=1e-5)
    assert set(shared[2]) == set(padded[2])
    assert any(n.startswith("bridge") for n in padded[2])  # the images' latents are in the graph
    for name, g in padded[2].items():
        torch.testing.assert_close(shared[2][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_same_values_and_gradients_as_the_padded_forward(policy: UnifiedPolicy, attention: str) -> None:
    ids, attn, loss, counts, latents = _rows(policy)
    plan = _plan(policy, ids, attn, loss, counts, latents)
    assert plan is not None and plan.num_prompts == 2 and plan.group.tolist() == [0, 0, 0, 1, 1, 1]
    # packed rows: [prompt 0 (its image: slot 0) | rows 0, 1 (draws slot 2), 2], [prompt 1 | rows 3, 4 (slot 4), 5]
    assert plan.num_rows == 2 and plan.slot_index.tolist() == [0, 2, 4]
    config = policy.lm.config
    default, config._attn_implementation = config._attn_implementation, attention  # boolean vs additive mask
    try:
        _assert_same_as_padded(policy, ids, attn, latents, plan)
    finally:
        config._attn_implementation = default


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_values_and_gradients_on_cuda(policy: UnifiedPolicy) -> None:
    """The plan and the packed forward on CUDA tensors (float32, TF32 off) against the padded one there."""
    import copy

    cuda_policy = copy.deepcopy(policy).cuda()
    ids, attn, loss, counts, latents = (x.cuda() for x in _rows(policy))
    plan = _plan(cuda_policy, ids, attn, loss, counts, latents)
    assert plan is not None and plan.num_rows == 2 and plan.segment.is_cuda
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _assert_same_as_padded(cuda_policy, ids, attn, latents, plan)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_long_completions_split_a_group_over_packed_rows(policy: UnifiedPolicy) -> None:
    """A packed row holds at most twice the batch's width: completions much longer than their prompt go to
    several rows, each repeating the prompt (and its image), with the same values."""
    long = " ".join(["the circle is red and the square is blue"] * 12)  # much longer than either prompt
    ids, attn, loss, counts, latents = _rows(policy, [(long, False), (long + " so I draw", True), (long, False)])
    plan = _plan(policy, ids, attn, loss, counts, latents)
    assert plan.num_prompts == 2 and plan.num_rows > 2
    assert plan.segment.shape[1] <= 2 * ids.shape[1]
    _assert_same_as_padded(policy, ids, attn, latents, plan)


def test_rows_share_only_identical_prompts(policy: UnifiedPolicy) -> None:
    ids, attn, loss, counts, latents = _rows(policy)
    # slots, row-major: row 0 [prompt image], row 1 [prompt image, generated], row 2 [prompt image],
    # row 4 [generated]; rows 0-2 hold equal copies of their prompt's image
    changed = latents.clone()
    changed[1] = changed[1] + 1.0  # row 1's prompt image now differs: same tokens, not the same prompt
    plan = _plan(policy, ids, attn, loss, counts, changed)
    assert plan.group.tolist() == [0, 1, 0, 2, 2, 2]  # row 1 gets its own prefix
    rows = [0, 3]  # one sample per prompt: nothing is shared
    sel = torch.tensor(rows)
    slot_rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    assert _plan(policy, ids[sel], attn[sel], loss[sel], counts[sel], latents[torch.isin(slot_rows, sel)]) is None
    left = attn.flip(1)  # a left-padded batch (positions would not start at 0): no sharing
    assert _plan(policy, ids, left, loss, counts, latents) is None


def test_learner_outputs_match_with_and_without_sharing(policy: UnifiedPolicy) -> None:
    """``learner.objective.policy_outputs``: the token log-probs and entropies the GRPO loss reads are the
    same with and without sharing, and equal to a plain log-softmax over the full logits."""
    from learner.batch import TrainBatch
    from learner.objective import policy_outputs
    from policy.prompting import mask_unsampleable

    ids, attn, loss, counts, latents = _rows(policy)
    b = ids.shape[0]
    batch = TrainBatch(ids, attn, loss, torch.zeros(ids.shape), torch.zeros(b), latents, counts,
                       torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                       torch.zeros((0, 1, *policy.latent_shape)), torch.zeros((0, 1, *policy.latent_shape)),
                       torch.zeros((0, 1)), torch.zeros((0, 1)), torch.zeros((0, 1)),
                       torch.zeros((0, *policy.latent_shape)), torch.arange(b), torch.ones(b), torch.zeros(0))
    with torch.no_grad():
        a = policy_outputs(policy, batch, 1.0, 0.7, shared_prefix=False)
        s = policy_outputs(policy, batch, 1.0, 0.7, shared_prefix=True)
        logits = policy.lm_forward(ids, attn, latents)[0][:, :-1]
        full = mask_unsampleable(logits.float(), policy.token_ids).log_softmax(-1).gather(-1, ids[:, 1:, None])
    sampled = loss[:, 1:]
    torch.testing.assert_close(a.logp[:, 1:][sampled], full.squeeze(-1)[sampled], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.logp[loss], a.logp[loss], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.entropy[loss], a.entropy[loss], rtol=1e-5, atol=1e-5)
    assert (a.logp[~loss] == 0).all() and (a.entropy[loss] > 0).all()


def test_an_image_conditioned_on_the_whole_sequence_keeps_the_last_token(policy: UnifiedPolicy) -> None:
    """GvU conditions its image on the whole prompt (``cond_end`` = the row's length): the packed forward
    keeps those rows' last token, so the image windows' log-probs equal the padded forward's."""
    from learner.batch import collate
    from learner.objective import policy_outputs, shared_prefix_plan
    from rollout.engine import HFTextEngine
    from rollout.image import gvu_rollout
    from rollout.interleaved import RolloutSettings

    settings = RolloutSettings(group_size=3, max_new_tokens=8, sde_steps=4, sde_window=2)
    reqs = [{"prompt_id": "p", "text": "a red circle"}, {"prompt_id": "q", "text": "two blue squares"}]
    trajs = gvu_rollout(policy, HFTextEngine(policy), reqs, settings, 1, torch.Generator().manual_seed(0))
    batch = collate(trajs, torch.zeros(6), policy.token_ids["pad"])
    assert (batch.seg_cond_end == batch.attention_mask.sum(1)[batch.seg_rows]).all()
    assert shared_prefix_plan(policy, batch) is not None
    with torch.no_grad():
        packed = policy_outputs(policy, batch, 1.0, 0.7, shared_prefix=True)
        padded = policy_outputs(policy, batch, 1.0, 0.7, shared_prefix=False)
    torch.testing.assert_close(packed.img_logp, padded.img_logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(packed.img_mean, padded.img_mean, rtol=0, atol=1e-6)
