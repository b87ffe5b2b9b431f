"""The reward as a Ray Serve app (HTTP JSON) and as a deployment handle for the training driver.

HTTP: ``POST {route_prefix}/score`` with

    {"items": [{"response_text": "<answer>B</answer>",
                "meta": {"answer": "B", "choices": ["red", "blue"], "answer_type": "choice"},
                "images": {"source_image": "<base64 PNG>", "reconstruction": "<base64 PNG>"}}]}

returns ``{"n": 1, "totals": [...], "components": {"answer": [...], ...}}`` (NaN -> null). ``images`` are
only needed by ``clip_similarity``: each is decoded to uint8 (H, W, 3) and put into ``meta`` under its key.
Bad JSON or an undecodable image -> 400, schema errors -> 422, a body over
``cfg.reward.serve.max_body_mb`` -> 413. ``GET {route_prefix}/healthz`` and ``/stats`` also exist.

Driver: ``RewardServeClient(handle).score(trajectories)`` fills ``reward`` and ``reward_components`` like
``RewardActor.score`` (only ``response_text`` and ``meta`` travel).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation of the
# ingress methods (string annotations are not resolved inside Serve replicas).
import asyncio
import threading
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from ray import serve

from services.http_io import RequestError, decode_image, error_response, json_float, parse_model, read_json

MAX_RESPONSE_CHARS = 32_768
MAX_ITEMS = 4096
MAX_IMAGES_PER_ITEM = 4

ShortStr = Annotated[str, StringConstraints(max_length=4096)]
ImageKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
Scalar = ShortStr | int | float


class ItemMeta(BaseModel):
    """What the built-in rewards read from ``meta``."""

    model_config = ConfigDict(extra="forbid")

    answer: Scalar | Annotated[list[Scalar], Field(max_length=64)] | None = None
    choices: Annotated[list[ShortStr], Field(max_length=26)] | None = None
    answer_type: Literal["choice", "number", "text"] | None = None
    rel_tol: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    abs_tol: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_text: Annotated[str, StringConstraints(max_length=MAX_RESPONSE_CHARS)]
    meta: ItemMeta = Field(default_factory=ItemMeta)
    images: Annotated[dict[ImageKey, str], Field(max_length=MAX_IMAGES_PER_ITEM)] | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[ScoreItem], Field(max_length=MAX_ITEMS)]


def to_reward_inputs(req: ScoreRequest) -> list[dict]:
    """Validated items -> the dicts ``RewardSet.combine`` takes (images decoded into ``meta``)."""
    out = []
    for i, item in enumerate(req.items):
        meta = item.meta.model_dump(exclude_none=True)
        for key, b64 in (item.images or {}).items():
            meta[key] = decode_image(b64, f"items[{i}].images.{key}")
        out.append({"response_text": item.response_text, "meta": meta})
    return out


app = FastAPI(title="unigrpo reward", docs_url=None, redoc_url=None)


@serve.deployment
@serve.ingress(app)
class RewardDeployment:
    """A ``RewardSet`` behind HTTP; models load once per replica. Scoring is serialised per replica."""

    def __init__(self, specs: list[dict], max_body_bytes: int, torch_threads: int = 1) -> None:
        import torch

        from reward.registry import RewardSet

        torch.set_num_threads(max(1, int(torch_threads)))
        self.rewards = RewardSet(specs)
        self.max_body_bytes = int(max_body_bytes)
        self._lock = threading.Lock()

    def score_values(self, items: list[Any]) -> tuple[list[float], dict[str, list[float]]]:
        """Handle path: ``(totals, components)`` for dicts / trajectories with response_text and meta."""
        with self._lock:
            return self.rewards.combine(items)

    def specs(self) -> list[dict]:
        return [{"name": s.name, "weight": s.weight, "kwargs": s.kwargs, "label": s.label}
                for s in self.rewards.specs]

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"ok": True, "components": [s.key for s in self.rewards.specs]}

    @app.get("/stats")
    def stats(self) -> dict:
        return self.rewards.stats.as_dict()

    @app.post("/score")
    async def score(self, request: Request):
        try:
            req = parse_model(ScoreRequest, await read_json(request, self.max_body_bytes))
            items = to_reward_inputs(req)
        except RequestError as e:
            return error_response(e)
        totals, components = await asyncio.to_thread(self.score_values, items)
        return {"n": len(items), "totals": [json_float(x) for x in totals],
                "components": {k: [json_float(x) for x in v] for k, v in components.items()}}


def reward_specs(cfg: Any) -> list[dict]:
    return [c.scorer_spec() for c in cfg.reward.components]


def build_reward_app(cfg: Any) -> Any:
    """The bound reward app: specs from ``cfg.reward.components``, autoscaling and body limit from
    ``cfg.reward.serve``, ``cfg.reward.num_cpus`` per replica."""
    sc = cfg.reward.serve
    auto = {"min_replicas": sc.autoscaling.min_replicas, "max_replicas": sc.autoscaling.max_replicas,
            "initial_replicas": max(1, sc.autoscaling.min_replicas)}
    threads = max(1, int(cfg.reward.num_cpus))
    dep = RewardDeployment.options(autoscaling_config=auto,
                                   ray_actor_options={"num_cpus": cfg.reward.num_cpus})
    return dep.bind(reward_specs(cfg), int(sc.max_body_mb * 1024 * 1024), threads)


class RewardServeClient:
    """``RewardActor.score`` semantics over a Serve deployment handle (the driver's reward backend
    ``serve``)."""

    def __init__(self, handle: Any, timeout_s: float | None = 600.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def score_values(self, trajectories: list[Any]) -> tuple[list[float], dict[str, list[float]]]:
        from reward.registry import reward_view

        payload = [reward_view(t) for t in trajectories]
        return self.handle.score_values.remote(payload).result(timeout_s=self.timeout_s)

    def score(self, trajectories: list[Any]) -> list[Any]:
        """Fill ``reward`` (NaN when a weighted component failed) and ``reward_components``; returns them."""
        if not trajectories:
            return trajectories
        totals, components = self.score_values(trajectories)
        for i, t in enumerate(trajectories):
            t.reward = float(totals[i])
            t.reward_components = {k: float(v[i]) for k, v in components.items()}
        return trajectories
