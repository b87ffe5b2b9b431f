"""Ray Serve reward and policy apps over real HTTP on 127.0.0.1 (one Ray + Serve for the module)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from bad_requests import bomb_png, policy_requests, reward_requests

BODY_LIMIT_MB = 0.25

pytestmark = pytest.mark.slow  # the module's Ray + Serve stays up between its tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(h: int = 20, w: int = 24, seed: int = 0) -> str:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(url: str, body: bytes | dict, timeout: float = 60.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def _forced_gen_checkpoint(path) -> None:
    """A tiny policy whose LM always emits <gen>: the last layer's attention writes a huge constant into
    hidden dimension 0 (v_proj = bias only, o_proj reads it into dim 0), and lm_head's column 0 is zero
    except on the <gen> row, which is biased upward."""
    from policy.config import PolicyConfig
    from policy.model import UnifiedPolicy

    p = UnifiedPolicy.from_config(PolicyConfig())
    with torch.no_grad():
        attn = p.lm.model.layers[-1].self_attn
        attn.v_proj.weight.zero_()
        attn.v_proj.bias.fill_(10.0)
        attn.o_proj.weight.zero_()
        attn.o_proj.weight[0, :] = 1.0
        head = p.lm.get_output_embeddings().weight
        head[:, 0] = 0.0
        head[p.token_ids["gen"], 0] = 5.0
    p.save_pretrained(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from services.config import load_config
    from services.serve_apps import start_policy_app, start_reward_app

    cfg = load_config(None, [
        f"reward.serve.max_body_mb={BODY_LIMIT_MB}",
        "reward.serve.autoscaling.min_replicas=1",
        "reward.serve.autoscaling.max_replicas=1",
        "reward.num_cpus=0.25",
        "rollout.num_cpus_per_worker=0.25",
        "rollout.max_new_tokens=8",
        "rollout.sde.steps=4",
        "rollout.sde.window=1",
    ])
    ckpt = tmp_path_factory.mktemp("policy_ckpt")
    _forced_gen_checkpoint(ckpt)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        reward_handle = start_reward_app(cfg, "127.0.0.1", port)
        policy_handle = start_policy_app(cfg, str(ckpt), "127.0.0.1", port)
        base = f"http://127.0.0.1:{port}"
        yield {"cfg": cfg, "reward": f"{base}{cfg.reward.serve.route_prefix}", "policy": f"{base}/policy",
               "reward_handle": reward_handle, "policy_handle": policy_handle}
    finally:
        serve.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------------------------------ reward
def test_reward_scores(served) -> None:
    items = [
        {"response_text": "<answer>B</answer>", "meta": {"answer": "B", "choices": ["red", "blue"]}},
        {"response_text": "<answer>A</answer>", "meta": {"answer": "B", "choices": ["red", "blue"]}},
        {"response_text": "it is 3.0", "meta": {"answer": 3}},
        {"response_text": "<answer>12</answer>", "meta": {"answer": "12", "answer_type": "number"}},
    ]
    status, out = _post(f"{served['reward']}/score", {"items": items})
    assert status == 200, out
    assert out["n"] == 4
    assert out["components"]["answer"] == [1.0, 0.0, 0.0, 1.0]
    assert out["components"]["format"] == [1.0, 1.0, 0.0, 1.0]
    assert out["totals"] == pytest.approx([1.1, 0.1, 0.0, 1.1])
    status, out = _post(f"{served['reward']}/score", {"items": []})
    assert status == 200 and out["totals"] == []


@pytest.mark.parametrize("body, status, where", [
    ({"items": [{"response_text": 123, "meta": {"answer": "B"}}]}, 422, "response_text"),
    ({"items": "nope"}, 422, "items"),
    ({"items": [{"response_text": "x", "meta": {"answer_type": "poem"}}]}, 422, "answer_type"),
    ({"items": [{"response_text": "x", "meta": {"choices": "AB"}}]}, 422, "choices"),
    ({"items": [{"response_text": "x", "meta": {"answer": "B", "surprise": 1}}]}, 422, "surprise"),
    ({"items": [{"meta": {"answer": "B"}}]}, 422, "response_text"),
    ({}, 422, "items"),
    ({"items": [{"response_text": "x" * 40_000}]}, 422, "response_text"),
    (b"{not json", 400, "JSON"),
    ({"items": [{"response_text": "x", "images": {"source_image": "%%%not-base64%%%"}}]}, 400,
     "items[0].images.source_image"),
    ({"items": [{"response_text": "x", "images": {"recon": base64.b64encode(b"plain bytes").decode()}}]}, 400,
     "items[0].images.recon"),
])
def test_reward_bad_input_is_4xx(served, body, status, where) -> None:
    code, out = _post(f"{served['reward']}/score", body)
    assert code == status, out
    assert where in json.dumps(out["detail"])


def test_reward_body_limit_413(served) -> None:
    big = {"items": [{"response_text": "x" * 30_000, "meta": {"answer": "B"}}] * 12}  # ~360 KB > 0.25 MB
    code, out = _post(f"{served['reward']}/score", big)
    assert code == 413, out
    assert "limit" in out["detail"]


def test_reward_images_reach_meta() -> None:
    from services.serve_reward import ScoreRequest, to_reward_inputs

    req = ScoreRequest.model_validate({"items": [{"response_text": "x", "images": {"source_image": _png(),
                                                                                  "reconstruction": _png(seed=1)}}]})
    meta = to_reward_inputs(req)[0]["meta"]
    assert meta["source_image"].shape == (20, 24, 3) and meta["source_image"].dtype == np.uint8
    assert not np.array_equal(meta["source_image"], meta["reconstruction"])


def test_reward_client_fills_trajectories(served) -> None:
    from policy.trajectory import Trajectory
    from services.serve_reward import RewardServeClient

    def traj(text: str) -> Trajectory:
        return Trajectory(prompt_id="p", group_index=0, input_ids=torch.arange(4), prompt_len=2,
                          loss_mask=torch.tensor([False, False, True, True]), behaviour_logp=torch.zeros(4),
                          slot_latents=torch.zeros(0, 4, 8, 8), response_text=text, meta={"answer": "7"})

    trajs = [traj("<answer>7</answer>"), traj("<answer>8</answer>"), traj("")]
    out = RewardServeClient(served["reward_handle"]).score(trajs)
    assert out is trajs
    assert [t.reward for t in trajs] == pytest.approx([1.1, 0.1, 0.0])
    assert trajs[0].reward_components == {"answer": 1.0, "format": 1.0}
    assert all(isinstance(v, float) for t in trajs for v in t.reward_components.values())
    assert not any(math.isnan(t.reward) for t in trajs)


# ------------------------------------------------------------------------------------------ policy
def test_policy_answers_and_returns_png(served) -> None:
    from PIL import Image

    body = {"image": _png(40, 40), "question": "What color is the square?", "choices": ["red", "blue"],
            "return_image": True, "seed": 3}
    code, out = _post(f"{served['policy']}/answer", body, timeout=120)
    assert code == 200, out
    assert isinstance(out["response_text"], str) and "<gen>" in out["response_text"]
    assert "answer" in out and (out["answer"] is None or isinstance(out["answer"], str))
    assert out["triggered"] is True
    img = Image.open(io.BytesIO(base64.b64decode(out["generated_image"])))
    size = served["cfg"].model.image_size
    assert img.format == "PNG" and img.size == (size, size)

    code, out = _post(f"{served['policy']}/answer", {**body, "return_image": False}, timeout=120)
    assert code == 200 and out["generated_image"] is None


@pytest.mark.parametrize("body, status, where", [
    ({"image": "@@broken@@", "question": "q?"}, 400, "image"),
    ({"image": base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode(), "question": "q?"}, 400, "image"),
    ({"image": _png()}, 422, "question"),
    ({"question": 5}, 422, "question"),
    ({"question": "q?", "return_image": "maybe"}, 422, "return_image"),
    ({"question": "q?", "max_new_tokens": 0}, 422, "max_new_tokens"),
])
def test_policy_bad_input_is_4xx(served, body, status, where) -> None:
    code, out = _post(f"{served['policy']}/answer", body)
    assert code == status, out
    assert where in json.dumps(out["detail"])


def test_policy_body_limit_413(served) -> None:
    code, out = _post(f"{served['policy']}/answer", {"question": "q" * 400_000})
    assert code == 413, out


def test_serve_policy_needs_checkpoint() -> None:
    from services.config import ConfigError, load_config
    from services.serve_apps import serve

    with pytest.raises(ConfigError, match="checkpoint"):
        serve("policy", load_config(), checkpoint=None)


# ------------------------------------------------------------------------------------- malformed corpus
def _send_raw(url: str, headers: dict, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    """POST ``body`` as is (no Content-Type unless ``headers`` has one)."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest("POST", "/" + path, skip_accept_encoding=True)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


@pytest.mark.parametrize("app", ["reward", "policy"])
def test_malformed_corpus_is_4xx_and_server_stays_healthy(served, app) -> None:
    good = _png()
    corpus = reward_requests(good) if app == "reward" else policy_requests(good)
    assert len(corpus) >= 100
    url = f"{served['reward']}/score" if app == "reward" else f"{served['policy']}/answer"
    bad = {}
    for name, headers, body in corpus:
        status, raw = _send_raw(url, headers, body)
        if not 400 <= status < 500:
            bad[name] = (status, raw[:200])
        else:
            json.loads(raw)  # every error is a JSON body
    assert not bad, bad
    healthz = f"{served['reward'] if app == 'reward' else served['policy']}/healthz"
    assert _get(healthz)[0] == 200
    if app == "reward":
        code, out = _post(url, {"items": [{"response_text": "<answer>B</answer>", "meta": {"answer": "B"}}]})
        assert code == 200 and out["totals"] == pytest.approx([1.1])
    else:
        code, out = _post(url, {"image": good, "question": "q?", "max_new_tokens": 2, "seed": 0}, timeout=120)
        assert code == 200 and isinstance(out["response_text"], str)


def test_huge_image_is_413_before_decoding(served) -> None:
    """A valid 20000 x 20000 PNG (50 KB compressed) is refused from its header: PIL never decodes it."""
    img = base64.b64encode(bomb_png()).decode()
    code, out = _post(f"{served['reward']}/score", {"items": [{"response_text": "x", "images": {"src": img}}]})
    assert code == 413 and "items[0].images.src" in out["detail"] and "20000x20000" in out["detail"]
    code, out = _post(f"{served['policy']}/answer", {"image": img, "question": "q?"})
    assert code == 413 and "image" in out["detail"]


def test_deep_json_and_nan_are_400(served) -> None:
    code, out = _post(f"{served['reward']}/score", b'{"items": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    assert code == 400 and "nested" in out["detail"]
    code, out = _post(f"{served['reward']}/score", b'{"items": [{"response_text": "x", "meta": {"answer": NaN}}]}')
    assert code == 400 and "NaN" in out["detail"]
