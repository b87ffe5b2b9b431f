"""The normative math of DESIGN.md: SDE step, sampler window, advantages, losses."""

import math

import pytest
import torch

from learner.advantage import group_advantages, zero_variance_groups
from learner.losses import image_policy_loss, kl_penalty, text_policy_loss, total_loss
from policy.sde import euler_step, flow_sigmas, sample_latents, sde_step, window_log_probs, window_starts


def test_sde_step_log_prob_is_gaussian_density():
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    a = 0.7
    prev, lp, mean, std = sde_step(x, v, sigma, sigma_next, a)
    s, sn = sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1)
    dt = sn - s
    std_t = a * torch.sqrt(s / (1 - s))
    want_mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std, std_t * torch.sqrt(-dt))
    ref = torch.distributions.Normal(want_mean, std_t * torch.sqrt(-dt)).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)


def test_sde_step_at_sigma_one_uses_next_sigma_in_std():
    x, v = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    _, lp, _, std = sde_step(x, v, 1.0, 0.75, 0.5)
    assert torch.isfinite(lp).all()
    want = 0.5 * math.sqrt(1.0 / (1 - 0.75)) * math.sqrt(0.25)
    assert std.flatten()[0].item() == pytest.approx(want)


def test_sde_step_scores_given_sample_and_rejects_bad_shapes():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    prev, lp, _, _ = sde_step(x, v, 0.5, 0.4, 0.7)
    _, lp2, _, _ = sde_step(x, v, 0.5, 0.4, 0.7, prev_sample=prev)
    torch.testing.assert_close(lp, lp2)
    with pytest.raises(ValueError, match="same shape"):
        sde_step(x, v[:1], 0.5, 0.4, 0.7)
    with pytest.raises(TypeError, match="floating"):
        sde_step(x.long(), v.long(), 0.5, 0.4, 0.7)


class _TinyVelocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, sigma):
        return self.conv(x) * (1 + sigma.view(-1, 1, 1, 1))


@pytest.mark.parametrize("position", ["fixed", "random"])
def test_window_rerun_reproduces_recorded_log_probs(position):
    torch.manual_seed(1)
    net = _TinyVelocity()
    gen = torch.Generator().manual_seed(3)
    sigmas = flow_sigmas(6, shift=3.0)
    starts = window_starts(5, 6, 2, position, 1, generator=gen)
    rec = sample_latents(net, torch.randn(5, 4, 8, 8), sigmas, 2, 0.7, starts, generator=gen)
    assert rec.latents.shape == (5, 2, 4, 8, 8) and rec.log_probs.shape == (5, 2)
    # consecutive window steps chain: x_next of step j is x of step j+1
    torch.testing.assert_close(rec.next_latents[:, 0], rec.latents[:, 1])
    lp, mean, std = window_log_probs(net, rec.latents, rec.next_latents, rec.sigmas, rec.sigma_nexts, 0.7)
    assert torch.equal(lp, rec.log_probs) or torch.allclose(lp, rec.log_probs, atol=1e-6, rtol=0)
    assert mean.shape == rec.latents.shape and std.shape == (5, 2)


def test_sampler_outside_window_is_euler():
    net = _TinyVelocity()
    noise = torch.randn(2, 4, 8, 8)
    sigmas = flow_sigmas(4)
    rec = sample_latents(net, noise, sigmas, 1, 0.7, torch.tensor([3, 3]))
    x = noise
    with torch.no_grad():
        for k in range(3):
            x = euler_step(x, net(x, sigmas[k].expand(2)), sigmas[k], sigmas[k + 1])
    torch.testing.assert_close(rec.latents[:, 0], x)


def test_group_advantages():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    a = group_advantages(r, 4)
    assert torch.all(a[:4] == 0)
    assert a[4:].sum().abs() < 1e-6 and a[5] > 0 > a[4]
    torch.testing.assert_close(group_advantages(r, 4, scale="none")[4:], torch.tensor([-0.5, 0.5, -0.5, 0.5]))
    assert zero_variance_groups(r, 4).tolist() == [True, False]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 4, scale="max")


def test_text_loss_ratio_one_is_minus_mean_advantage():
    logp = torch.randn(3, 5, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    loss, m = text_policy_loss(logp, logp.detach().clone(), adv, mask)
    want = -(adv[:, None] * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert m["clipfrac"] == 0 and m["ratio_min"] == pytest.approx(1.0)
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        text_policy_loss(logp, logp.detach(), adv, mask, agg=agg)


def test_text_loss_clipped_side_passes_no_gradient():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.5, 0.0, -0.5], [0.5, 0.0, -0.5]], requires_grad=True)  # rho = e^.5, 1, e^-.5
    adv = torch.tensor([1.0, -1.0])
    loss, m = text_policy_loss(logp, old, adv, torch.ones(2, 3), clip_low=0.2, clip_high=0.2)
    loss.backward()
    g = logp.grad
    # A>0 and rho > 1+eps: clipped, no gradient; A<0 and rho < 1-eps: clipped, no gradient
    assert g[0, 0] == 0 and g[1, 2] == 0
    assert g[0, 1] != 0 and g[0, 2] != 0 and g[1, 0] != 0
    assert m["clipfrac"] == pytest.approx(2 / 6)


def test_k3_nonnegative_and_zero_only_when_equal():
    a = torch.randn(1000, dtype=torch.float64)
    b = a + torch.randn(1000, dtype=torch.float64)
    k3 = kl_penalty(a, b, "k3")
    assert (k3 >= 0).all() and (k3 > 0).all()
    assert torch.all(kl_penalty(a, a, "k3") == 0)
    assert torch.all(kl_penalty(a, b, "k2") >= 0)


def test_text_loss_kl_term_and_shape_errors():
    logp = torch.zeros(2, 3)
    ref = torch.full((2, 3), -1.0)
    base, _ = text_policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 3))
    with_kl, m = text_policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 3), ref_logp=ref, beta=0.1)
    assert with_kl.item() == pytest.approx(base.item() + 0.1 * (math.exp(-1) + 1 - 1), abs=1e-6)
    assert m["kl_ref"] > 0
    with pytest.raises(ValueError, match="advantages must have shape"):
        text_policy_loss(logp, logp, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(TypeError, match="old_logp must be a floating"):
        text_policy_loss(logp, logp.long(), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="agg"):
        text_policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 3), agg="sum")


def test_image_loss_ratio_one_kl_and_total():
    lp = torch.randn(4, 2, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    loss, m = image_policy_loss(lp, lp.detach(), adv)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    mean = torch.randn(4, 2, 3, 4, 4)
    std = torch.full((4, 2), 0.5)
    l_kl, m_kl = image_policy_loss(lp, lp.detach(), adv, beta=1.0, mean=mean, ref_mean=mean + 0.5, std=std)
    assert m_kl["kl_ref"] == pytest.approx(0.25 / (2 * 0.25))
    assert l_kl.item() == pytest.approx(loss.item() + 0.5, abs=1e-5)
    with pytest.raises(ValueError, match="beta != 0"):
        image_policy_loss(lp, lp, adv, beta=1.0)
    with pytest.raises(ValueError, match="log_prob must be"):
        image_policy_loss(lp[0], lp[0], adv)
    t = total_loss(torch.tensor(1.0), torch.tensor(2.0), 0.5)
    assert t.item() == 2.0


def test_inverse_cdf_draws_follow_probs_and_skip_empty_tokens():
    """The GPU sampling path (``rollout.engine.inverse_cdf``: CPU uniforms, CDF on the policy's device):
    never a zero-probability token, and draws follow the (unnormalised, nucleus-truncated) probabilities."""
    from rollout.engine import inverse_cdf

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.6, 0.2, 0.0]])
    edges = torch.tensor([0.0, 0.2 - 1e-6, 0.2 + 1e-6, 1 - 1e-12, math.nextafter(1.0, 0.0)], dtype=torch.float64)
    got = inverse_cdf(probs.expand(5, -1) * 4.0, edges)  # any total mass
    assert got.tolist() == [1, 1, 3, 4, 4]
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(inverse_cdf(probs.expand(20000, -1), u), minlength=6).double() / 20000
    assert torch.allclose(freq, probs[0].double(), atol=0.015)
