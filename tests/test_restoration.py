"""Restoration, measured, and "does generating help?": PSNR / SSIM (tasks.quality), the tiny VAE fitted to the
task's clean images (services.vae_fit), forced / forbidden generation in CLEAR's rollout
(rollout.interleaved), and the evaluation report with every field (services.evaluate): in process through
the pool's sampling interface, and end to end through ``run_eval`` on a local Ray cluster (slow)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from learner.batch import collate
from learner.objective import policy_outputs
from policy.config import PolicyConfig
from policy.model import UnifiedPolicy
from policy.prompting import encode_prompt
from policy.sde import restoration_flow, restoration_sources, restoration_start
from recipes import get_recipe
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings, rollout
from services.config import load_config
from services.evaluate import EvalReport, accuracy_report, compare, eval_sets, log_report
from services.tracking import Tracker
from services.vae_fit import (
    FIT_FILE,
    applies,
    cache_path,
    clean_images,
    prepare,
    reconstruction_quality,
    train_vae,
    with_checkpoint_vae,
)
from tasks.quality import PSNR_CAP_DB, SSIM_K1, SSIM_K2, gaussian_window, psnr, ssim
from tests.service_helpers import metric, ray_down  # noqa: F401 - fixture: marks the Ray test slow, shuts Ray down

torch.set_num_threads(2)

SETTINGS = RolloutSettings(group_size=2, max_new_tokens=8, sde_steps=4, sde_window=2, temperature=1.0)
SMALL = ["task.train_size=64", "task.eval_size=6", "vae_fit.images=64", "vae_fit.eval_images=6",
         "vae_fit.epochs=1", "evaluation.severities=[1, 3]", "evaluation.bootstrap_samples=200"]


# ---- PSNR / SSIM ------------------------------------------------------------------------------------
def test_psnr_known_values():
    x = np.zeros((4, 4, 3))
    assert psnr(x, x + 0.1) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(1 / 0.01)
    a, b = np.zeros((2, 8, 8, 3), np.uint8), np.full((2, 8, 8, 3), 51, np.uint8)  # 51 / 255 = 0.2 -> MSE 0.04
    assert psnr(a, b) == pytest.approx([10 * np.log10(1 / 0.04)] * 2)
    assert psnr(a, a).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    with pytest.raises(ValueError):
        psnr(a, b[:, :4])


def _ssim_direct(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM by its definition, one window position and channel at a time (an independent check of the
    separable filter): the mean over valid positions and channels of the local SSIM under a 2-D Gaussian."""
    g = gaussian_window(window, sigma)
    w2 = np.outer(g, g)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    vals = []
    for ch in range(x.shape[-1]):
        for i in range(x.shape[0] - window + 1):
            for j in range(x.shape[1] - window + 1):
                px, py = x[i:i + window, j:j + window, ch], y[i:i + window, j:j + window, ch]
                mx, my = (w2 * px).sum(), (w2 * py).sum()
                vx, vy = (w2 * (px - mx) ** 2).sum(), (w2 * (py - my) ** 2).sum()
                cxy = (w2 * (px - mx) * (py - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_its_definition_and_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.random((16, 16, 3))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    assert ssim(x, y) == pytest.approx(_ssim_direct(x, y), rel=1e-9)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, y) == pytest.approx(ssim(y, x))  # symmetric
    noisier = np.clip(x + rng.normal(0, 0.3, x.shape), 0, 1)
    assert ssim(x, noisier) < ssim(x, y) < 1.0
    # flat images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    flat = ssim(np.full((12, 12, 3), a), np.full((12, 12, 3), b))
    assert flat == pytest.approx((2 * a * b + SSIM_K1**2) / (a**2 + b**2 + SSIM_K1**2))
    batch = ssim(np.stack([x, x]), np.stack([x, y]))
    assert batch.shape == (2,) and batch[0] == pytest.approx(1.0) and batch[1] == pytest.approx(ssim(x, y))


# ---- the tiny VAE fit --------------------------------------------------------------------------------
def test_vae_fit_reaches_its_psnr_bar_on_held_out_images():
    cfg = load_config(None, [])
    train, held = clean_images(cfg, "train", 128), clean_images(cfg, "eval", 32)
    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg.model.vae_tiny_config())
    before = reconstruction_quality(vae, held)
    mean_image = np.broadcast_to(train.mean(0, keepdims=True) / 255.0, held.shape)
    baseline = float(psnr(mean_image, held).mean())  # what predicting the average image scores (~18 dB)
    losses = train_vae(vae, train, epochs=6, batch_size=16, lr=4e-3, kl_weight=1e-6, seed=0, progress=False)
    after = reconstruction_quality(vae, held)
    assert len(losses) == 6 * 8 and losses[-1] < losses[0] / 5
    assert before["psnr_db"] < 14  # random init: noise
    assert after["psnr_db"] >= 20.0 and after["psnr_db"] > baseline + 2.0
    assert after["ssim"] > 0.55 > before["ssim"] + 0.4


def test_prepare_fits_once_caches_and_the_policy_loads_it(tmp_path):
    cfg = load_config(None, [*SMALL, f"checkpoint.dir={tmp_path}"])
    assert applies(cfg)
    assert not applies(load_config(None, [*SMALL, "vae_fit.enabled=false"]))
    assert not applies(load_config(None, [*SMALL, f"model.vae_path={tmp_path}"]))
    out = prepare(cfg, progress=False)
    where = cache_path(cfg)
    assert out.model.vae_path == str(where) and where.parent.name == "tiny-vae"
    record = json.loads((where / FIT_FILE).read_text())
    assert record["train_images"] == 64 and record["eval_images"] == 6 and record["steps"] == 2
    assert np.isfinite(record["psnr_db"]) and record["psnr_db"] > 10
    stamp = (where / FIT_FILE).stat().st_mtime_ns
    assert prepare(cfg, progress=False) == out and (where / FIT_FILE).stat().st_mtime_ns == stamp  # cached
    assert cache_path(load_config(None, [*SMALL, f"checkpoint.dir={tmp_path}", "vae_fit.epochs=2"])) != where
    assert [p.name for p in where.parent.iterdir()] == [where.name]  # no temporary directory left

    policy = UnifiedPolicy.from_config(out.model)
    train = clean_images(cfg, "train", 64)
    lat = policy.encode_image(torch.as_tensor(train).permute(0, 3, 1, 2).float() / 255.0)
    assert abs(float(lat.mean())) < 1e-3 and float(lat.std()) == pytest.approx(1.0, abs=1e-3)  # shift / scale
    held = clean_images(cfg, "eval", 6)
    dec = policy.decode_latent(policy.encode_image(torch.as_tensor(held).permute(0, 3, 1, 2).float() / 255.0))
    through_policy = float(psnr(dec.permute(0, 2, 3, 1).numpy(), held).mean())
    assert through_policy == pytest.approx(record["psnr_db"], abs=0.05)  # the policy decodes with the fit

    policy.save_pretrained(tmp_path / "saved")
    again = with_checkpoint_vae(cfg, tmp_path / "saved")
    assert again.model.vae_path == str(tmp_path / "saved" / "vae")
    assert with_checkpoint_vae(out, tmp_path / "saved") == out  # a configured VAE stays


# ---- forced / forbidden generation ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy() -> UnifiedPolicy:
    return UnifiedPolicy.from_config(PolicyConfig(seed=0))


@pytest.fixture(scope="module")
def requests():
    cfg = load_config(None, ["task.eval_size=6"])
    return get_recipe("clear").requests(eval_sets(cfg, [3])["severity3"])


def prefers_gen(policy: UnifiedPolicy, requests) -> UnifiedPolicy:
    """A copy whose <gen> output row points along the prompt-end hidden states: after a prompt it opens with
    <gen> (greedy), as a stage-1 model trained to generate-then-answer does."""
    p = copy.deepcopy(policy)
    hs = []
    for r in requests:
        ids = torch.tensor([encode_prompt(p.tokenizer, r["text"], p.n_image_tokens)])
        lat = p.encode_image(torch.as_tensor(r["image"]).permute(2, 0, 1)[None].float() / 255.0)
        with torch.no_grad():
            hs.append(p.lm_forward(ids, torch.ones_like(ids), lat)[1][0, -1])
    h = torch.stack(hs).mean(0)
    with torch.no_grad():
        p.lm.get_output_embeddings().weight[p.token_ids["gen"]] = 40.0 * h / h.norm()
    return p


def _roll(policy, requests, **overrides):
    return rollout(policy, HFTextEngine(policy), requests, replace(SETTINGS, **overrides), 1,
                   torch.Generator().manual_seed(0))


def _recomputes(policy, trajs) -> None:
    batch = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
    with torch.no_grad():
        out = policy_outputs(policy, batch, SETTINGS.temperature, SETTINGS.sde_noise_level)
    m = batch.loss_mask
    assert torch.allclose(out.logp[m], batch.behaviour_logp[m], atol=1e-4)


def test_forced_generation_puts_a_latent_in_every_trajectory(policy, requests):
    gen = policy.token_ids["gen"]
    auto = _roll(policy, requests, temperature=0.0)
    assert sum(t.generated_image for t in auto) < len(auto)  # the random-init model rarely chooses to
    forced = _roll(policy, requests, generation="force")
    assert len(forced) == len(requests) * SETTINGS.group_size
    for t in forced:
        t.validate()
        (seg,) = t.images
        assert seg.final_latent.shape == policy.latent_shape and seg.window == SETTINGS.sde_window
        assert int(t.input_ids[t.prompt_len]) == gen and not bool(t.loss_mask[t.prompt_len])  # not sampled
        assert float(t.behaviour_logp[t.prompt_len]) == 0.0
        assert t.slot_latents.shape[0] == 2  # the input image and the generation
        assert t.response_text.startswith("<gen>")
        assert seg.cond_end == t.prompt_len + 1
    assert all(t.response_len >= 1 for t in forced)  # the answer after the image was sampled
    _recomputes(policy, forced)  # the learner reads forced trajectories as the rollout wrote them
    assert _roll(policy, requests, generation="force", max_images=0)[0].generated_image  # force wins


def test_forbidden_generation_never_generates(policy, requests):
    gen = policy.token_ids["gen"]
    eager = prefers_gen(policy, requests)
    chosen = _roll(eager, requests, temperature=0.0)
    assert all(t.generated_image for t in chosen)  # left to choose, this model always generates
    for temperature in (0.0, 1.0):
        forbidden = _roll(eager, requests, generation="forbid", temperature=temperature)
        assert not any(t.generated_image for t in forbidden)
        for t in forbidden:
            t.validate()
            assert gen not in t.input_ids[t.prompt_len:].tolist() and t.slot_latents.shape[0] == 1
            lp = t.behaviour_logp[t.loss_mask]
            assert t.response_len >= 1 and torch.isfinite(lp).all() and bool((lp <= 0).all())
    with pytest.raises(ValueError, match="generation"):
        RolloutSettings(generation="sometimes")


def test_restoration_flow_is_the_plain_flow_at_strength_one_and_ends_at_its_start():
    g = torch.Generator().manual_seed(0)
    x0, eps, src = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    u = torch.rand(5, generator=g)
    xt, t, v = restoration_flow(x0, eps, src, u, 1.0)  # s = 1: the source plays no part
    assert torch.equal(t, u)
    plain = (1 - u.view(-1, 1, 1, 1)) * x0 + u.view(-1, 1, 1, 1) * eps
    assert torch.allclose(xt, plain, atol=1e-6) and torch.allclose(v, eps - x0, atol=1e-6)
    s = 0.4
    start = restoration_start(eps, src, s)
    assert torch.allclose(start, 0.6 * src + 0.4 * eps, atol=1e-6)
    ends = restoration_flow(x0, eps, src, torch.ones(5), s)
    assert torch.allclose(ends[0], start, atol=1e-6) and torch.allclose(ends[1], torch.full((5,), s))
    assert torch.allclose(restoration_flow(x0, eps, src, torch.zeros(5), s)[0], x0, atol=1e-6)
    # Euler along the target velocity from the start, over sigmas s..0, lands on the data
    sig = s * torch.linspace(1, 0, 5)
    x = start
    for k in range(4):
        x = x + (sig[k + 1] - sig[k]) * restoration_flow(x0, eps, src, sig[k] / s * torch.ones(5), s)[2]
    assert torch.allclose(x, x0, atol=1e-5)


def test_a_restoration_starts_from_the_input_image_and_recomputes(policy, requests):
    at0 = {"generation": "force", "sde_window_position": "fixed", "sde_window_start": 0}
    forced = _roll(policy, requests, sde_strength=0.5, **at0)
    for t in forced:
        (seg,) = t.images
        assert float(seg.sigmas.max()) <= 0.5 + 1e-6  # the steps run from sigma 0.5 down
    _recomputes(policy, forced)  # the learner's recomputed window log-probs are the rollout's
    # the same noise and condition from another input latent give another restoration: it starts from the input
    dark = [{**r, "image": (r["image"] // 4).astype(np.uint8)} for r in requests]
    other = _roll(policy, dark, sde_strength=0.5, **at0)
    plain = _roll(policy, requests, **at0)
    for a, b, c in zip(forced, other, plain):  # the same noise: the starts differ by (1 - s) x the inputs' latents
        diff = a.images[0].latents[0] - b.images[0].latents[0]
        assert torch.allclose(diff, 0.5 * (a.slot_latents[0] - b.slot_latents[0]), atol=1e-5)
        assert not torch.allclose(a.images[0].final_latent, b.images[0].final_latent, atol=1e-4)
        src = a.slot_latents[0]  # from noise, the first state does not hold the input
        assert float((a.images[0].latents[0] - src).abs().mean()) < float((c.images[0].latents[0] - src).abs().mean())
    with pytest.raises(ValueError, match="input image"):
        restoration_sources([torch.zeros((0, *policy.latent_shape))], 0.5)
    with pytest.raises(ValueError, match="sde_strength"):
        RolloutSettings(sde_strength=0.0)


def test_read_generation_pixels_reads_the_decoded_and_re_encoded_image(policy, requests):
    latent = _roll(policy, requests, generation="force")
    for t in latent:  # the bridge reads the generated latent itself
        assert torch.equal(t.slot_latents[1], t.images[0].final_latent)
    ablation = copy.copy(policy)
    ablation.cfg = policy.cfg.model_copy(update={"read_generation": "pixels"})
    reread = _roll(ablation, requests, generation="force")
    for a, b in zip(latent, reread):
        final = b.images[0].final_latent
        assert torch.equal(final, a.images[0].final_latent)  # the same generation (same seed)
        with torch.no_grad():
            pixels = (policy.decode_latent(final[None]) * 255).round() / 255
            assert torch.allclose(b.slot_latents[1], policy.encode_image(pixels)[0], atol=1e-3)
        assert float((b.slot_latents[1] - final).abs().max()) > 0.05
    _recomputes(ablation, reread)


# ---- the evaluation report ---------------------------------------------------------------------------
class InProcessPool:
    """The rollout pool's interface (``generate``, ``call("decode")``) over one policy in this process."""

    def __init__(self, policy: UnifiedPolicy, settings: RolloutSettings) -> None:
        self.policy, self.settings, self.engine = policy, settings, HFTextEngine(policy)

    def generate(self, requests, seed, overrides=None):
        s = replace(self.settings, **(overrides or {}))
        return rollout(self.policy, self.engine, requests, s, 0, torch.Generator().manual_seed(seed))

    def call(self, method, *args):
        assert method == "decode"
        with torch.no_grad():
            return self.policy.decode_latent(args[0])


MODES = ("greedy", "sampled", "forced", "forbidden")


def check_report_fields(data: dict, sets: list[str]) -> None:
    """Every field of the report: per set, accuracy and trigger rate per mode, restoration and input PSNR /
    SSIM on degraded sets, forced-vs-forbidden; per item, ids and correctness per mode."""
    assert sorted(data["by_set"]) == sorted(sets) and sorted(data["items"]) == sorted(sets)
    for name in sets:
        row = data["by_set"][name]
        for mode in MODES:
            assert 0 <= row[mode]["accuracy"] <= 1 and 0 <= row[mode]["trigger_rate"] <= 1
            assert len(data["items"][name]["correct"][mode]) == len(data["items"][name]["prompt_ids"])
        assert row["forced"]["trigger_rate"] == 1.0 and row["forbidden"]["trigger_rate"] == 0.0
        assert 0 <= row["forced_vs_forbidden"]["mcnemar_p"] <= 1
        assert row["forced_vs_forbidden"]["diff"] == pytest.approx(
            row["forced"]["accuracy"] - row["forbidden"]["accuracy"])
        for group in ("restoration", "input"):
            assert np.isfinite(row[group]["psnr_db"]) and -1 <= row[group]["ssim"] <= 1
        m = data["metrics"]
        assert m[f"eval/{name}/accuracy"] == row["greedy"]["accuracy"]
        assert m[f"eval/{name}/sampled/trigger_rate"] == row["sampled"]["trigger_rate"]
        assert m[f"eval/{name}/restoration/psnr_db"] == row["restoration"]["psnr_db"]
    assert data["by_set"]["clean"]["input"]["psnr_db"] == PSNR_CAP_DB  # the clean input is the clean image
    for name in sets[1:]:
        assert data["by_set"][name]["input"]["psnr_db"] < 40  # a degraded input is not


def test_report_has_every_field_and_pairs_two_stages(policy, tmp_path):
    cfg = load_config(None, [*SMALL, "evaluation.severities=[3]", "task.eval_size=5"])
    pool = InProcessPool(policy, SETTINGS)
    report = accuracy_report(pool, cfg)
    sets = ["clean", "severity3"]
    data = report.to_json()
    check_report_fields(data, sets)
    assert EvalReport.from_json(json.loads(json.dumps(data))).correct == report.correct  # JSON round trip

    everything = [it for items in eval_sets(cfg).values() for it in items]
    later = accuracy_report(InProcessPool(prefers_gen(policy, get_recipe("clear").requests(everything)), SETTINGS), cfg)
    assert later.metrics["eval/severity3/trigger_rate"] > report.metrics["eval/severity3/trigger_rate"]
    paired = compare(report, later, cfg.evaluation.bootstrap_samples, cfg.seed)
    for name in sets:
        for mode in MODES:
            key = f"compare/{name}/{mode}"
            assert 0 <= paired[f"{key}/mcnemar_p"] <= 1 and 0 <= paired[f"{key}/bootstrap_p"] <= 1
            assert paired[f"{key}/diff"] == pytest.approx(
                later.metrics[f"eval/{name}/{mode + '/' if mode != 'greedy' else ''}accuracy"]
                - report.metrics[f"eval/{name}/{mode + '/' if mode != 'greedy' else ''}accuracy"])
            assert paired[f"{key}/n"] == 5
    self_paired = compare(report, report, 200, 0)
    assert all(v == 1.0 for k, v in self_paired.items() if k.endswith(("mcnemar_p", "bootstrap_p")))

    tracker = Tracker(load_config(None, [*SMALL, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]))
    path = log_report(tracker, later, 3, tmp_path / "out", "_final", paired)
    tracker.end()
    written = json.loads(path.read_text())
    check_report_fields(written, sets)
    assert written["comparison"] == paired and path.name == "eval_final.json"
    for png in ("generation_by_severity_final.png", "restoration_final.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.tracking.MlflowClient(tracker.uri)
    logged = {a.path for a in client.list_artifacts(tracker.run_id, "eval")}
    assert {"eval/eval_final.json", "eval/generation_by_severity_final.png", "eval/restoration_final.png"} <= logged
    assert {f"eval/samples_final_{s}.png" for s in sets} <= logged
    for key in ("compare/severity3/greedy/mcnemar_p", "eval/severity3/restoration/psnr_db",
                "eval/clean/forbidden/accuracy"):
        assert metric(tracker.uri, tracker.run_id, key) == [(3, pytest.approx({**later.metrics, **paired}[key]))]


def test_run_eval_end_to_end_on_ray(tmp_path, ray_down):  # noqa: F811 - the fixture
    from services.evaluate import run_eval

    cfg = load_config(None, [*SMALL, "evaluation.severities=[3]", f"checkpoint.dir={tmp_path}/ck",
                             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "rollout.max_new_tokens=8"])
    fitted = prepare(cfg, progress=False)
    UnifiedPolicy.from_config(fitted.model).save_pretrained(tmp_path / "policy")
    first = tmp_path / "first"
    assert run_eval(cfg, str(tmp_path / "policy"), out_dir=str(first)) == 0
    data = json.loads((first / "eval.json").read_text())
    check_report_fields(data, ["clean", "severity3"])
    assert run_eval(cfg, str(tmp_path / "policy"), out_dir=str(tmp_path / "second"),
                    baseline=str(first / "eval.json")) == 0
    again = json.loads((tmp_path / "second" / "eval.json").read_text())
    for k, v in data["metrics"].items():  # the same checkpoint and seed: the same answers (times differ)
        if "time_per_sample" not in k:
            assert again["metrics"][k] == pytest.approx(v), k
    cmp = again["comparison"]
    assert cmp["compare/severity3/forced/diff"] == 0 and cmp["compare/severity3/forced/mcnemar_p"] == 1.0
    assert (first / "generation_by_severity.png").is_file() and (first / "restoration.png").is_file()


def test_the_evals_every_k_steps_run_every_modes_on_the_highest_severity(policy):
    from services.evaluate import evaluate

    cfg = load_config(None, [*SMALL, "task.eval_size=3", "evaluation.every_modes=[greedy, forced]"])
    m = evaluate(InProcessPool(policy, SETTINGS), cfg, full=False)
    assert {k.split("/")[1] for k in m} == {"clean", "severity3"}  # the highest of severities [1, 3]
    assert np.isfinite(m["eval/severity3/restoration/psnr_db"]) and m["eval/severity3/forced/trigger_rate"] == 1
    assert not any("sampled" in k or "forbidden" in k for k in m)
    with pytest.raises(Exception, match="every_modes"):
        load_config(None, ["evaluation.every_modes=[]"])


def test_the_sample_strip_shows_each_degradation_kind_first():
    from services.evaluate import _strip_rows
    from tasks.items import PromptItem

    kinds = ["blur", "blur", "noise", "blur", "jpeg", "low_light"]
    items = [PromptItem(f"p{i}", np.full((8, 8, 3), i, np.uint8), "q", None, "A",
                        {"degradation": k, "clean_image": np.zeros((8, 8, 3), np.uint8)}) for i, k in enumerate(kinds)]
    restored = np.zeros((len(items), 8, 8, 3))
    strip = _strip_rows(items, restored, n=4)
    row_h = (strip.shape[0] - 3 * 8) // 4  # 4 rows, 8-pixel gaps between them
    firsts = [int(strip[r * (row_h + 8), 0, 0]) for r in range(4)]  # each row opens with its input image
    assert firsts == [0, 2, 4, 5]  # blur, noise, jpeg, low light: the second and third blur items wait
