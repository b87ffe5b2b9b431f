"""Flow-matching samplers: the stochastic (SDE) step with its log-probability, the plain Euler step,
and a K-step sampler whose window of W steps is stochastic and recorded for Flow-GRPO.

Convention: sigma runs from 1 (pure noise) to 0 (data); the model predicts the velocity v = dx/dsigma
of the rectified flow x_sigma = (1 - sigma) * x_data + sigma * noise, so v = noise - x_data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,...), sigma (B,)) -> v


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) value against x of shape (B, ...)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"sigma must be a scalar or shaped ({like.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.dim() - 1)))


def sde_step(
    x: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step; returns (prev_sample, log_prob (B,), mean, std).

    dt       = sigma_next - sigma                                   (negative)
    std_t    = a * sqrt(sigma / (1 - sigma'))   sigma' = sigma, or sigma_next where sigma == 1
    mean     = x*(1 + std_t^2/(2 sigma) dt) + v*(1 + std_t^2 (1 - sigma)/(2 sigma)) dt
    x_next   = mean + std_t sqrt(-dt) eps
    log_prob = mean over latent elements of log N(x_next; mean, (std_t sqrt(-dt))^2)
    ``std`` is the step's standard deviation std_t * sqrt(-dt), shaped like ``sigma`` broadcast to x.
    With ``prev_sample`` given, no noise is drawn: the log-prob of that sample is computed instead.
    """
    if x.shape != velocity.shape:
        raise ValueError(f"x {tuple(x.shape)} and velocity {tuple(velocity.shape)} must have the same shape")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x32, v32 = x.to(compute), velocity.to(compute)
    s = _per_sample(sigma, x32)
    s_next = _per_sample(sigma_next, x32)
    dt = s_next - s
    s_prime = torch.where(s == 1, s_next, s)
    std_t = noise_level * torch.sqrt(s / (1 - s_prime))
    mean = x32 * (1 + std_t**2 / (2 * s) * dt) + v32 * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(x32)
        prev_sample = mean + std * noise.to(compute)
    else:
        if prev_sample.shape != x.shape:
            raise ValueError(f"prev_sample {tuple(prev_sample.shape)} must match x {tuple(x.shape)}")
        prev_sample = prev_sample.to(compute)
    log_density = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )
    log_prob = log_density.mean(dim=tuple(range(1, x.dim())))
    return prev_sample.to(x.dtype), log_prob, mean, std


def euler_step(
    x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """Deterministic (ODE) step: x_next = x + v * (sigma_next - sigma)."""
    return x + velocity * (_per_sample(sigma_next, x) - _per_sample(sigma, x))


@torch.no_grad()
def sample_ode(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Plain Euler sampling over the whole schedule (no recorded window)."""
    x, sig = noise, sigmas.tolist()
    for k in range(sigmas.shape[0] - 1):  # euler_step, fused: x + (sigma_next - sigma) * v
        x = torch.add(x, velocity_fn(x, sigmas[k].expand(x.shape[0]).to(x)), alpha=sig[k + 1] - sig[k])
    return x


def restoration_start(noise: torch.Tensor, source: torch.Tensor | None, strength: float) -> torch.Tensor:
    """The sampler's start at sigma = ``strength`` (diffusers' img2img knob): the source latent, noised.

        x_s = (1 - s) z_src + s eps          (s = 1, or no source: pure noise, eps)

    The K steps then run over ``strength`` x the schedule's sigmas (from s to 0)."""
    if strength == 1.0 or source is None:
        return noise
    return (1.0 - strength) * source.to(noise) + strength * noise


def restoration_plan(noise: torch.Tensor, source: torch.Tensor | None, strength: float,
                     sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, sigmas) of a sampler run: :func:`restoration_start` and ``strength`` x the schedule's sigmas, or
    (noise, sigmas) when there is no source (generation from noise runs the whole schedule)."""
    if source is None:
        return noise, sigmas
    return restoration_start(noise, source, strength), strength * sigmas


def restoration_sources(slot_latents: list[torch.Tensor], strength: float) -> torch.Tensor | None:
    """Each row's input-image latent (its first slot), the start of a restoration (strength < 1); None at
    strength 1. A row without an input image's latent cannot be restored from it: a ValueError."""
    if strength == 1.0:
        return None
    if any(lat.shape[0] == 0 for lat in slot_latents):
        raise ValueError("rollout.sde.strength < 1 restores from the input image's latent (a bridge slot); "
                         "a row has none")
    return torch.stack([lat[0] for lat in slot_latents])


def restoration_flow(x0: torch.Tensor, eps: torch.Tensor, source: torch.Tensor | None, u: torch.Tensor,
                     strength: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flow-matching point and target on the straight path from the sampler's start to the data
    (stage 1's generator loss; u ~ U(0, 1) per sample):

        x_s = (1 - s) z_src + s eps,   t = s u,   x_t = x0 + u (x_s - x0),   v* = dx_t/dt = (x_s - x0) / s

    returns (x_t, t, v*). With s = 1 this is the plain rectified flow x_t = (1 - t) x0 + t eps, v* = eps - x0;
    with s < 1 the generator learns to carry a noised source (the degraded input) to the clean latent."""
    start = restoration_start(eps, source, strength)
    uu = u.view(-1, *([1] * (x0.dim() - 1))).to(x0)
    return x0 + uu * (start - x0), strength * u, (start - x0) / strength


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """K+1 sigmas from 1 to 0; ``shift`` warps them as SD3 does: s' = shift*s / (1 + (shift-1)*s)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


def scheduler_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000, mu: float | None = None,
                     time_shift_type: str = "exponential", shift_terminal: float | None = None,
                     linspace: bool = False) -> torch.Tensor:
    """K+1 float32 sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(K, mu=mu)`` (``linspace``:
    of ``set_timesteps(sigmas=linspace(1, 1/K, K), mu=mu)``, as QwenImagePipeline calls it):

    f(s)       = shift*s / (1 + (shift-1)*s)                static shift (f = identity when mu is given)
    s_max      = f(1),  s_min = f(1/N)                      N = num_train_timesteps, in float32 as diffusers
    t_k        = s_max + (s_min - s_max) * k/(K-1)          k = 0..K-1 (t_0 = s_max when K = 1)
               = 1 + (1/K - 1) * k/(K-1)                    ``linspace`` (then all in float32, as diffusers)
    sigma_k    = f(t_k)                                     static
               = e^mu / (e^mu + (1/t_k - 1))                dynamic, exponential time shift
               = mu / (mu + (1/t_k - 1))                    dynamic, linear time shift
    terminal T: sigma_k = 1 - (1 - sigma_k) * (1 - T) / (1 - sigma_{K-1})
    sigma_K    = 0
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    # numpy, in diffusers' order and dtypes (float64; float32 for given sigmas): the same float32 sigmas
    if linspace:  # the pipeline's sigmas, which the scheduler casts to float32
        t = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    else:
        one = torch.tensor([1.0, 1.0 / num_train_timesteps], dtype=torch.float32)  # train sigmas' ends, float32
        ends = one if mu is not None else shift * one / (1 + (shift - 1) * one)
        t = np.linspace(float(ends[0]), float(ends[1]), steps)
    if mu is None:
        s = shift * t / (1 + (shift - 1) * t)
    elif time_shift_type == "exponential":
        s = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    elif time_shift_type == "linear":
        s = mu / (mu + (1 / t - 1))
    else:
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
    if shift_terminal:
        s = 1 - (1 - s) / ((1 - s[-1]) / (1 - shift_terminal))
    s = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return torch.cat([s.to(torch.float32), torch.zeros(1)])


def draw_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (the rollout's CPU generator), then moved to
    ``device``: a seed gives the same noise whether the policy runs on the CPU or a GPU. Without a generator
    it is drawn on ``device`` from the global RNG."""
    where = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)


@dataclass
class SampledLatents:
    """The sampler's record. Window tensors are (B, W, ...) / (B, W); ``final`` is (B, C, h, w)."""

    final: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    sigmas: torch.Tensor
    sigma_nexts: torch.Tensor
    log_probs: torch.Tensor
    window_start: torch.Tensor  # (B,) long

    def to(self, device: torch.device | str) -> SampledLatents:
        """The same record with every tensor on ``device`` (the rollout returns CPU tensors)."""
        return SampledLatents(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def window_starts(batch: int, steps: int, window: int, position: str, start: int, generator=None) -> torch.Tensor:
    """Where each sample's stochastic window begins: fixed at ``start``, or uniform per sample.

    Random windows avoid the last step (sigma_next = 0) when the schedule leaves room for that.
    """
    if not 1 <= window <= steps:
        raise ValueError(f"window must be in [1, steps={steps}], got {window}")
    if position == "fixed":
        if not 0 <= start <= steps - window:
            raise ValueError(f"window_start must be in [0, {steps - window}], got {start}")
        return torch.full((batch,), start, dtype=torch.long)
    if position != "random":
        raise ValueError(f"window_position must be 'fixed' or 'random', got {position!r}")
    high = steps - window if steps - window >= 1 else steps - window + 1
    return torch.randint(0, high, (batch,), generator=generator)


def _sde_coefficients(sigma: float, sigma_next: float, noise_level: float) -> tuple[float, float, float]:
    """``sde_step``'s mean = x * cx + v * cv and its std, for one sigma shared by the batch (Python floats)."""
    dt = sigma_next - sigma
    s_prime = sigma_next if sigma == 1 else sigma
    std_t = noise_level * math.sqrt(sigma / (1 - s_prime))
    cx = 1 + std_t**2 / (2 * sigma) * dt
    cv = (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return cx, cv, std_t * math.sqrt(-dt)


@torch.no_grad()
def sample_latents(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    window: int,
    noise_level: float,
    starts: torch.Tensor,
    generator: torch.Generator | None = None,
) -> SampledLatents:
    """Run K = len(sigmas) - 1 steps from ``noise``; steps [start_b, start_b + W) of sample b are SDE
    steps whose (x, x_next, sigma, sigma_next, log_prob) are recorded, the others plain Euler steps.
    Classifier-free guidance lives in ``velocity_fn`` (see :func:`guided`).

    The loop does only what sampling needs (a fused Euler update, and on steps where some sample is in its
    window the SDE update and a select); the window's tensors are gathered and its log-probs computed once
    at the end, in one batch, by :func:`sde_step` from the recorded (x, v, x_next): the same function the
    learner's :func:`window_log_probs` runs.
    """
    b, steps = noise.shape[0], sigmas.shape[0] - 1
    starts = starts.to(torch.long)
    if bool(((starts < 0) | (starts + window > steps)).any()):
        raise ValueError(f"window starts {starts.tolist()} + window {window} outside the {steps} steps")
    sig = sigmas.tolist()
    k_of = torch.arange(steps)[:, None]
    in_window = (k_of >= starts[None]) & (k_of < starts[None] + window)  # (K, B)
    any_in = in_window.any(1).tolist()
    shape1 = (b, *([1] * (noise.dim() - 1)))
    compute = torch.float32 if noise.dtype in (torch.float16, torch.bfloat16) else noise.dtype
    x = noise
    rec_x, rec_v, rec_next = [], [], []
    rec_pos = torch.full((steps,), -1, dtype=torch.long)
    for k in range(steps):
        v = velocity_fn(x, sigmas[k].expand(b).to(noise))
        dt = sig[k + 1] - sig[k]
        if not any_in[k]:
            x = torch.add(x, v, alpha=dt)  # euler_step
            continue
        cx, cv, std = _sde_coefficients(sig[k], sig[k + 1], noise_level)
        eps = draw_normal(x.shape, generator, x.device, compute)  # on the generator's device, then moved
        x_sde = torch.add(torch.add(x.to(compute) * cx, v.to(compute), alpha=cv), eps, alpha=std).to(x.dtype)
        rec_pos[k] = len(rec_x)
        rec_x.append(x)
        rec_v.append(v)
        rec_next.append(x_sde)
        x = torch.where(in_window[k].view(shape1).to(x.device), x_sde, torch.add(x, v, alpha=dt))
    ks = starts[:, None] + torch.arange(window)[None]  # (B, W): the step of each window slot (CPU)
    rows = torch.arange(b)[:, None].expand(b, window)
    pos = rec_pos[ks]
    gather = lambda xs: torch.stack(xs)[pos.to(noise.device), rows.to(noise.device)]  # noqa: E731
    lat, vel, nxt = gather(rec_x), gather(rec_v), gather(rec_next)
    s_w, sn_w = sigmas[ks].to(noise), sigmas[ks + 1].to(noise)
    _, lp, _, _ = sde_step(lat.flatten(0, 1), vel.flatten(0, 1), s_w.flatten(), sn_w.flatten(), noise_level,
                           prev_sample=nxt.flatten(0, 1))
    return SampledLatents(x, lat, nxt, s_w, sn_w, lp.view(b, window).to(s_w.dtype), starts)


def guided(cond_fn: VelocityFn, uncond_fn: VelocityFn | None, scale: float) -> VelocityFn:
    """Classifier-free guidance: v = v_u + scale * (v_c - v_u); scale 1 (or no uncond) is v_c."""
    if uncond_fn is None or scale == 1.0:
        return cond_fn

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v_uncond = uncond_fn(x, sigma)
        return v_uncond + scale * (cond_fn(x, sigma) - v_uncond)

    return velocity


def window_log_probs(
    velocity_fn: VelocityFn,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    sigmas: torch.Tensor,
    sigma_nexts: torch.Tensor,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute the window's log-probs from stored latents (B, W, ...): returns (log_prob (B, W),
    mean (B, W, ...), std (B, W)). All W steps of all samples go through ``velocity_fn`` in one batch
    of B*W rows, sample-major (row b*W + j is step j of sample b): repeat conditioning accordingly.
    """
    b, w = latents.shape[:2]
    x = latents.flatten(0, 1)
    s, sn = sigmas.flatten(), sigma_nexts.flatten()
    v = velocity_fn(x, s)
    _, lp, mean, std = sde_step(x, v, s, sn, noise_level, prev_sample=next_latents.flatten(0, 1))
    return lp.view(b, w), mean.view(b, w, *latents.shape[2:]), std.view(b, w)
