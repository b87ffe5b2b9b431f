"""Reward registry and weighted combination.

A reward function takes a batch of trajectories (``Trajectory`` objects, or dicts with the same keys:
``response_text``, ``meta``) and a ``RewardContext`` and returns one float per trajectory.

    REWARDS["answer"](trajectories, ctx) -> list[float]

Adding a reward (the "gvu" reward lives in another module):

    from reward.registry import register_reward

    @register_reward("gvu", setup=build_gvu_scorer)   # setup(kwargs, resources) -> ctx.state, run once
    def gvu_reward(trajectories, ctx): ...

A spec naming an unregistered reward ``foo`` imports ``reward.foo`` (if it exists) and looks again; a
name ``"pkg.module:function"`` imports that function directly. The optional ``setup`` runs once per
``RewardSet`` (the reward actor builds one at construction), so models load once.

``combine`` calls each reward once on the whole batch; if that call raises (or returns the wrong
length or a non-number), the reward is retried one trajectory at a time so that only the failing
trajectories lose it. A component that raises or is NaN / inf makes that trajectory's total NaN; the
caller drops NaN totals. Components with weight 0 are logged only and never invalidate the total.
Counts go to ``RewardStats``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reward.answer import answer_reward
from reward.format import format_reward
from reward.names import KNOWN_REWARDS

log = logging.getLogger(__name__)


@dataclass
class RewardContext:
    """What a reward function sees besides the trajectories.

    ``kwargs``: the spec's kwargs. ``state``: what the reward's ``setup`` returned (a loaded model...).
    ``resources``: shared objects the host passed (e.g. the policy, for GvU). ``extras``: a reward may put
    extra per-trajectory lists here (e.g. per-backbone similarities); they are logged as
    ``"<key>/<name>"`` components and never enter the total.
    """

    kwargs: dict = field(default_factory=dict)
    state: Any = None
    resources: dict = field(default_factory=dict)
    extras: dict[str, list[float]] = field(default_factory=dict)


RewardFn = Callable[[Sequence[Any], RewardContext], list[float]]
SetupFn = Callable[[dict, dict], Any]

REWARDS: dict[str, RewardFn] = {}
SETUPS: dict[str, SetupFn] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, setup: SetupFn | None = None,
                    overwrite: bool = False) -> Any:
    """Register ``fn`` under ``name`` (usable as a decorator). ``setup(kwargs, resources)`` builds state once."""

    def _register(f: RewardFn) -> RewardFn:
        if name in REWARDS and not overwrite and REWARDS[name] is not f:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = f
        if setup is not None:
            SETUPS[name] = setup
        else:
            SETUPS.pop(name, None)
        return f

    return _register(fn) if fn is not None else _register


def get_reward(name: str) -> tuple[RewardFn, SetupFn | None]:
    """The function (and setup) for ``name``, importing ``reward.<name>`` or ``module:function`` if needed."""
    if name in REWARDS:
        return REWARDS[name], SETUPS.get(name)
    if ":" in name:
        mod_name, attr = name.split(":", 1)
        fn = getattr(importlib.import_module(mod_name), attr)
        setup = getattr(fn, "reward_setup", None)
        return fn, setup
    if name.isidentifier() and importlib.util.find_spec(f"reward.{name}") is not None:
        importlib.import_module(f"reward.{name}")
        if name in REWARDS:
            return REWARDS[name], SETUPS.get(name)
    raise KeyError(f"unknown reward {name!r}; known: {sorted(set(REWARDS) | set(KNOWN_REWARDS))}")


# ------------------------------------------------------------------------------------------ access
def traj_text(t: Any) -> str:
    return t["response_text"] if isinstance(t, dict) else t.response_text


def traj_meta(t: Any) -> dict:
    m = t.get("meta") if isinstance(t, dict) else t.meta
    return m or {}


def reward_view(t: Any) -> dict:
    """What rewards read of a trajectory, as the dict form above: the response text and the task fields,
    plus ``meta["generated_latent"]`` when it generated an image. Shipped to the reward actor instead of the
    whole trajectory (token ids, log-probs, SDE windows: ~4x the bytes and most of the pickling time)."""
    if isinstance(t, dict):
        return t
    meta = dict(traj_meta(t))
    images = getattr(t, "images", None)
    if images and "generated_latent" not in meta:
        meta["generated_latent"] = images[-1].final_latent
    return {"response_text": t.response_text, "meta": meta}


# ------------------------------------------------------------------------------------------ built-ins
def _answer(trajectories: Sequence[Any], ctx: RewardContext) -> list[float]:
    return [answer_reward(traj_text(t), {**ctx.kwargs, **traj_meta(t)}) for t in trajectories]


def _format(trajectories: Sequence[Any], ctx: RewardContext) -> list[float]:
    return [format_reward(traj_text(t), {**ctx.kwargs, **traj_meta(t)}) for t in trajectories]


_SIM_SETUP_KEYS = ("tiny", "device", "dtype", "max_batch", "seed")


def clip_setup(kwargs: dict, resources: dict) -> Any:
    from reward.clip_similarity import ImageSimilarity

    backbones = kwargs.get("backbones") or [{"kind": "clip", "weight": 1.0}]
    opts = {k: kwargs[k] for k in _SIM_SETUP_KEYS if k in kwargs}
    opts.setdefault("device", "auto")  # CUDA when the actor was given a GPU (Ray hides it otherwise)
    return ImageSimilarity(backbones, **opts)


def _clip_similarity(trajectories: Sequence[Any], ctx: RewardContext) -> list[float]:
    """Cosine similarity of ``meta[source_key]`` and ``meta[recon_key]`` (float (3,H,W) in [0,1] or uint8
    (H,W,3)); trajectories missing either image get NaN. Per-backbone values go to ``ctx.extras``."""
    from reward.clip_similarity import to_float_images

    sim = ctx.state if ctx.state is not None else clip_setup(ctx.kwargs, ctx.resources)
    src_key = ctx.kwargs.get("source_key", "source_image")
    rec_key = ctx.kwargs.get("recon_key", "reconstruction")
    out = [math.nan] * len(trajectories)
    extras = {label: [math.nan] * len(trajectories) for label in sim.labels}
    idx, src, rec = [], [], []
    for i, t in enumerate(trajectories):
        m = traj_meta(t)
        if m.get(src_key) is None or m.get(rec_key) is None:
            continue
        idx.append(i)
        src.append(to_float_images(m[src_key]))
        rec.append(to_float_images(m[rec_key]))
    if idx:
        total, per = sim.similarity(src, rec)
        for j, i in enumerate(idx):
            out[i] = float(total[j])
            for label, v in per.items():
                extras[label][i] = float(v[j])
    if len(sim.labels) > 1:
        ctx.extras.update(extras)
    return out


def _latent_quality(trajectories: Sequence[Any], ctx: RewardContext) -> list[float]:
    """How close a restoration is to the clean image, in the latent space the generator samples:

        r = -mean_(c,h,w) (z_generated - z_reference)^2

    (``meta["generated_latent"]`` against ``meta["reference_latent"]``, the clean image's latent the CLEAR rollout
    attaches); 0 for a trajectory without both. Meant for ``applies_to: denoising`` (its own group-normalised
    advantage on the denoising steps; ``services.step_batch``), where only trajectories that generated count."""
    out = []
    for t in trajectories:
        m = traj_meta(t)
        z, ref = m.get("generated_latent"), m.get("reference_latent")
        out.append(0.0 if z is None or ref is None else -float(((z.float() - ref.float()) ** 2).mean()))
    return out


def _answer_likelihood(trajectories: Sequence[Any], ctx: RewardContext) -> list[float]:
    """How well the policy reads the gold answer off its own restoration:

        r = log p(<answer_start> gold <answer_end> | prompt, response up to and including the generated image)

    (``meta["answer_logprob"]``, recorded by the CLEAR rollout when this reward is configured:
    ``RolloutSettings.gold_answer_logprob``); 0 for a
    trajectory without it. Meant for ``applies_to: denoising``: within a group it ranks the samples' restorations
    by how much they help the answer, a signal the 0/1 answer reward rarely carries to the denoising steps."""
    return [float(traj_meta(t).get("answer_logprob", 0.0)) for t in trajectories]


register_reward("answer", _answer)
register_reward("answer_likelihood", _answer_likelihood)
register_reward("latent_quality", _latent_quality)
register_reward("format", _format)
register_reward("clip_similarity", _clip_similarity, setup=clip_setup)
assert set(REWARDS) <= set(KNOWN_REWARDS), f"add {sorted(set(REWARDS) - set(KNOWN_REWARDS))} to reward.names"


# ------------------------------------------------------------------------------------------ specs
@dataclass
class RewardSpec:
    """One weighted component. ``key`` (``label`` or ``name``) names it in ``reward_components``."""

    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    label: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.name

    @classmethod
    def from_dict(cls, d: dict | RewardSpec) -> RewardSpec:
        if isinstance(d, RewardSpec):
            return d
        unknown = set(d) - {"name", "weight", "kwargs", "label"}
        if unknown:
            raise ValueError(f"unknown reward spec keys {sorted(unknown)} in {d}")
        if "name" not in d:
            raise ValueError(f"reward spec needs a 'name': {d}")
        w = float(d.get("weight", 1.0))
        if not math.isfinite(w):
            raise ValueError(f"reward {d['name']!r}: weight must be finite, got {w}")
        return cls(name=str(d["name"]), weight=w, kwargs=dict(d.get("kwargs") or {}), label=d.get("label"))


@dataclass
class RewardStats:
    """Counts over every ``combine`` call (the reward actor's ``stats()``)."""

    n_scored: int = 0
    n_nan_total: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # per component: the function raised
    nonfinite: dict[str, int] = field(default_factory=dict)  # per component: returned NaN / inf
    last_errors: list[str] = field(default_factory=list)
    max_errors: int = 20

    def error(self, key: str, exc: BaseException) -> None:
        self.failed[key] = self.failed.get(key, 0) + 1
        self.last_errors.append(f"{key}: {type(exc).__name__}: {exc}")
        del self.last_errors[: -self.max_errors]

    def as_dict(self) -> dict:
        return {"n_scored": self.n_scored, "n_nan_total": self.n_nan_total, "failed": dict(self.failed),
                "nonfinite": dict(self.nonfinite), "n_failed": sum(self.failed.values()),
                "n_nonfinite": sum(self.nonfinite.values()), "last_errors": list(self.last_errors)}


def _as_floats(values: Any, n: int) -> list[float]:
    vals = [float(v) for v in values]  # raises on non-numbers
    if len(vals) != n:
        raise ValueError(f"reward returned {len(vals)} values for {n} trajectories")
    return vals


class RewardSet:
    """Specs with their setup done once (models loaded); ``combine`` scores batches with them."""

    def __init__(self, specs: Sequence[dict | RewardSpec], resources: dict | None = None) -> None:
        self.specs = [RewardSpec.from_dict(s) for s in specs]
        if not self.specs:
            raise ValueError("at least one reward spec is needed")
        keys = [s.key for s in self.specs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate reward components {keys}; give repeated rewards a 'label'")
        self.resources = dict(resources or {})
        self.fns: dict[str, RewardFn] = {}
        self.contexts: dict[str, RewardContext] = {}
        for s in self.specs:
            fn, setup = get_reward(s.name)
            state = setup(s.kwargs, self.resources) if setup is not None else None
            self.fns[s.key] = fn
            self.contexts[s.key] = RewardContext(kwargs=s.kwargs, state=state, resources=self.resources)
        self.stats = RewardStats()

    def _component(self, spec: RewardSpec, trajectories: Sequence[Any]
                   ) -> tuple[list[float], dict[str, list[float]], list[BaseException]]:
        fn, base = self.fns[spec.key], self.contexts[spec.key]
        n = len(trajectories)
        ctx = RewardContext(kwargs=base.kwargs, state=base.state, resources=base.resources)
        try:
            return _as_floats(fn(trajectories, ctx), n), ctx.extras, []
        except Exception as exc:  # retry one by one so only the failing trajectories lose this reward
            if n == 1:
                return [math.nan], {}, [exc]
            log.warning("reward %s failed on a batch of %d (%s); retrying one by one", spec.key, n, exc)
        vals: list[float] = []
        extras: dict[str, list[float]] = {}
        errors: list[BaseException] = []
        for i, t in enumerate(trajectories):
            c = RewardContext(kwargs=base.kwargs, state=base.state, resources=base.resources)
            try:
                vals.append(_as_floats(fn([t], c), 1)[0])
            except Exception as exc:
                errors.append(exc)
                vals.append(math.nan)
            for k, v in c.extras.items():
                extras.setdefault(k, [math.nan] * n)[i] = v[0] if v else math.nan
        return vals, extras, errors

    def combine(self, trajectories: Sequence[Any], stats: RewardStats | None = None
                ) -> tuple[list[float], dict[str, list[float]]]:
        """``(totals, components)``: ``components[key][i]`` is reward ``key`` of trajectory ``i``.

        Counts go to ``self.stats`` and, if given, to ``stats`` too.
        """
        targets = [self.stats] + ([stats] if stats is not None and stats is not self.stats else [])
        n = len(trajectories)
        totals = [0.0] * n
        components: dict[str, list[float]] = {}
        for spec in self.specs:
            if n == 0:
                components[spec.key] = []
                continue
            vals, extras, errors = self._component(spec, trajectories)
            components[spec.key] = vals
            for sub, v in extras.items():
                components[f"{spec.key}/{sub}"] = [float(x) for x in v]
            bad = sum(1 for v in vals if not math.isfinite(v)) - len(errors)
            for st in targets:
                for exc in errors:
                    st.error(spec.key, exc)
                if bad:
                    st.nonfinite[spec.key] = st.nonfinite.get(spec.key, 0) + bad
            if spec.weight == 0.0:
                continue
            for i, v in enumerate(vals):
                totals[i] = totals[i] + spec.weight * v if math.isfinite(v) else math.nan
        n_nan = sum(1 for t in totals if math.isnan(t))
        if n_nan:
            log.warning("%d of %d trajectories have a NaN reward", n_nan, n)
        for st in targets:
            st.n_scored += n
            st.n_nan_total += n_nan
        return totals, components


def combine(trajectories: Sequence[Any], specs: Sequence[dict | RewardSpec] | RewardSet, *,
            stats: RewardStats | None = None, resources: dict | None = None
            ) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the components for each trajectory: ``(totals, components)``.

    ``specs`` may be a prepared ``RewardSet`` (models already loaded) or a list of specs (set up here,
    once per call). NaN totals (a component raised or was not finite) are counted in ``stats`` (and the
    set's own ``stats``) and logged; ``count_nan(totals)`` counts them too.
    """
    rs = specs if isinstance(specs, RewardSet) else RewardSet(specs, resources)
    return rs.combine(trajectories, stats)


def count_nan(totals: Sequence[float]) -> int:
    """How many totals are NaN (the trajectories the caller drops)."""
    return sum(1 for t in totals if math.isnan(t))
