"""The trained policy as a Ray Serve app: CLEAR's generate-then-answer on one image + question.

``POST /policy/answer`` with

    {"image": "<base64 PNG>", "question": "What color is the square?", "choices": ["red", "blue"],
     "return_image": true}

runs ``rollout.interleaved.rollout`` (group size 1, the transformers engine) and returns
``{"response_text", "answer", "triggered", "generated_image"}``: ``answer`` is parsed with
``reward.answer.extract_answer`` (null when the response has none); ``generated_image`` is the decoded
final latent of the generated image as a base64 PNG when ``return_image`` and the model emitted ``<gen>``,
else null. The image is resized to the model's ``image_size``. Optional ``max_new_tokens``,
``temperature`` (0 = greedy where the engine supports it) and ``seed``. A broken image is a 400 naming the
field, schema errors 422, an oversized body 413.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation of the
# ingress methods (string annotations are not resolved inside Serve replicas).
import asyncio
import dataclasses
import threading
from typing import Annotated, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from ray import serve

from services.http_io import RequestError, decode_image, encode_png, error_response, parse_model, read_json

MAX_QUESTION_CHARS = 8192
MAX_NEW_TOKENS = 1024


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = None
    question: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUESTION_CHARS)]
    choices: Annotated[list[Annotated[str, StringConstraints(max_length=1024)]], Field(max_length=26)] | None = None
    return_image: bool = False
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None


app = FastAPI(title="unigrpo policy", docs_url=None, redoc_url=None)


@serve.deployment
@serve.ingress(app)
class PolicyDeployment:
    """``UnifiedPolicy.from_pretrained(checkpoint)`` with the transformers engine; one request at a time
    per replica (the model is not shared between threads)."""

    def __init__(self, checkpoint: str, settings: dict, max_body_bytes: int, torch_threads: int = 1,
                 device: str = "cpu") -> None:
        import torch

        from policy.model import UnifiedPolicy
        from rollout.engine import HFTextEngine

        torch.set_num_threads(max(1, int(torch_threads)))
        self.policy = UnifiedPolicy.from_pretrained(checkpoint).to(device).eval()
        self.engine = HFTextEngine(self.policy)
        self.settings = dict(settings)
        self.max_body_bytes = int(max_body_bytes)
        self._lock = threading.Lock()

    def answer(self, req: AnswerRequest | dict) -> dict:
        """Handle path (and what the HTTP route runs after validation and image decoding)."""
        if isinstance(req, dict):
            req = parse_model(AnswerRequest, req)
        image = decode_image(req.image, "image") if req.image is not None else None
        return self._answer(req, image)

    def _answer(self, req: AnswerRequest, image: Any) -> dict:
        import numpy as np
        import torch
        from PIL import Image

        from reward.answer import extract_answer
        from rollout.interleaved import RolloutSettings, rollout
        from tasks.items import PromptItem, format_prompt

        p = self.policy
        if image is not None:
            size = int(p.cfg.image_size)
            if image.shape[:2] != (size, size):
                image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)
        text = format_prompt(PromptItem("serve", image, req.question, req.choices or None, ""))
        s = dict(self.settings)
        if req.max_new_tokens is not None:
            s["max_new_tokens"] = req.max_new_tokens
        if req.temperature is not None:
            s["temperature"] = req.temperature
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        with self._lock, torch.no_grad():
            traj = rollout(p, self.engine, [{"prompt_id": "serve", "text": text, "image": image, "meta": {}}],
                           RolloutSettings(**s), version=0, generator=gen)[0]
            png = None
            if req.return_image and traj.images:
                pixels = p.decode_latent(traj.images[0].final_latent[None].to(p.device))[0]
                png = encode_png(pixels.cpu().numpy())
        return {"response_text": traj.response_text, "answer": extract_answer(traj.response_text),
                "triggered": bool(traj.images), "generated_image": png}

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"ok": True, "image_size": int(self.policy.cfg.image_size)}

    @app.post("/answer")
    async def answer_http(self, request: Request):
        try:
            req = parse_model(AnswerRequest, await read_json(request, self.max_body_bytes))
            image = decode_image(req.image, "image") if req.image is not None else None
        except RequestError as e:
            return error_response(e)
        return await asyncio.to_thread(self._answer, req, image)


def build_policy_app(cfg: Any, checkpoint: str, *, max_body_mb: float | None = None) -> Any:
    """The bound policy app: resources from ``cfg.rollout`` (``num_cpus_per_worker``,
    ``num_gpus_per_worker``; CUDA when > 0), body limit ``max_body_mb`` or ``cfg.reward.serve.max_body_mb``."""
    from pathlib import Path

    from services.cluster import rollout_settings

    r = cfg.rollout
    limit = max_body_mb if max_body_mb is not None else cfg.reward.serve.max_body_mb
    device = "cuda" if r.num_gpus_per_worker > 0 else "cpu"
    dep = PolicyDeployment.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": r.num_cpus_per_worker, "num_gpus": r.num_gpus_per_worker},
    )
    settings = dataclasses.replace(rollout_settings(cfg, group_size=1), max_images=max(1, r.max_images))
    return dep.bind(str(Path(checkpoint).resolve()), vars(settings), int(limit * 1024 * 1024),
                    max(1, int(r.num_cpus_per_worker)), device)
