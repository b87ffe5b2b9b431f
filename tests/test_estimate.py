"""``unigrpo check-config --estimate``: every part at full size on the meta device, no weights (policy/estimate.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from policy.config import PolicyConfig
from policy.estimate import GIB, MemorySettings, estimate_memory, model_parts
from policy.known_archs import PUBLISHED_PARAMS
from policy.model import UnifiedPolicy
from services.config import load_config
from services.estimate import estimate_text

ROOT = Path(__file__).resolve().parents[1]
REAL = ["clear_qwen25_sd35", "uae_qwen25vl_sd35", "gvu_janus"]


def _parts(name: str) -> dict:
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"), [])
    return {p.name: p for p in model_parts(cfg.model)}


@pytest.mark.parametrize("name,part,arch", [
    ("uae_qwen25vl_sd35", "lm", "Qwen2.5-VL-7B-Instruct"),
    ("clear_qwen25_sd35", "lm", "Qwen2.5-7B-Instruct"),
    ("gvu_janus", None, "Janus-Pro-7B"),
    ("clear_qwen25_sd35", "generator", "stable-diffusion-3.5-medium/transformer"),
    ("uae_qwen_image", "lm", "Qwen2.5-VL-7B-Instruct"),  # the pipeline's text encoder
    ("uae_qwen_image", "generator", "Qwen-Image/transformer"),
])
def test_real_scale_parameter_counts_match_published_sizes(name, part, arch):
    parts = _parts(name)
    n = sum(p.params for p in parts.values()) if part is None else parts[part].params + parts[part].buffers
    assert abs(n / PUBLISHED_PARAMS[arch] - 1) < 0.10, (arch, n)


def test_frozen_parts_follow_the_config():
    uae = _parts("uae_qwen25vl_sd35")  # model.freeze_generator: the generator side is part of the reward
    assert uae["lm"].trainable and not uae["generator"].trainable and not uae["connector"].trainable
    assert not uae["vae"].trainable and not _parts("gvu_janus")["janus.vq"].trainable


def test_qwen_image_pipeline_is_one_model_without_a_connector():
    parts = _parts("uae_qwen_image")
    assert set(parts) == {"lm", "bridge", "generator", "vae"}  # the transformer reads the LM's hidden states
    assert "Qwen-Image/text_encoder" in parts["lm"].source and "Qwen-Image/vae" in parts["vae"].source
    assert parts["lm"].trainable and not parts["generator"].trainable
    assert parts["generator"].tokens == (512 // 8 // 2) ** 2 + 256  # packed 2 x 2 latent tokens + condition
    res = subprocess.run([sys.executable, "-m", "services.cli", "check-config", "--estimate", "--config",
                          "configs/uae_qwen_image.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ZeRO 3" in res.stdout and "published config of Qwen-Image/transformer" in res.stdout


def test_tiny_counts_equal_the_built_policy():
    """The default config's parts on the meta device have exactly the parameters of the real tiny policy."""
    cfg = load_config(None, [])
    parts = {p.name: p.params for p in model_parts(cfg.model)}
    policy = UnifiedPolicy.from_config(cfg.model)
    built = {name: sum(p.numel() for p in getattr(policy, name).parameters())
             for name in ("lm", "bridge", "generator", "connector", "vae")}
    assert parts == built


def test_a_directorys_own_config_wins_over_the_table(tmp_path):
    lm_dir = tmp_path / "Qwen2.5-7B-Instruct"  # the table's name, but a different (tiny) model on disk
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=64, vocab_size=600)).save_pretrained(lm_dir)
    parts = {p.name: p for p in model_parts(PolicyConfig(lm_path=str(lm_dir)))}
    assert parts["lm"].source == str(lm_dir / "config.json") and parts["lm"].params < 1e6
    with pytest.raises(ValueError, match="model.lm_path.*policy.known_archs"):
        model_parts(PolicyConfig(lm_path=str(tmp_path / "SomeOtherLM-70B")))


def test_memory_lines_follow_zero_stage_dtype_and_offload():
    parts = _parts("clear_qwen25_sd35")
    p_all = sum(p.params + p.buffers for p in parts.values())
    p_train = sum(p.params for p in parts.values() if p.trainable)
    z0 = estimate_memory(list(parts.values()), MemorySettings(ranks=4, zero_stage=0, dtype="bfloat16"))
    assert z0.lines["weights"] == 2 * p_all and z0.lines["gradients"] == 2 * p_train
    assert z0.lines["optimizer"] == 12 * p_train  # fp32 m, v and master weights
    z3 = estimate_memory(list(parts.values()), MemorySettings(ranks=4, zero_stage=3, dtype="bfloat16",
                                                              offload_optimizer=True, gradient_checkpointing=True))
    assert z3.lines["weights"] == 2 * p_all / 4 and z3.lines["gradients"] == 2 * p_train / 4
    assert z3.lines["optimizer"] == 0 and z3.host == 12 * p_train / 4
    assert z3.lines["activations"] < z0.lines["activations"] / 4  # checkpointing keeps layer inputs only
    fp32 = estimate_memory(list(parts.values()), MemorySettings(ranks=1, zero_stage=0, dtype="float32"))
    assert fp32.lines["optimizer"] == 8 * p_train and fp32.lines["weights"] == 4 * p_all
    assert 50 * GIB < z0.gpu_bytes  # a 10B model does not fit a rank without sharding


@pytest.mark.parametrize("name", REAL)
def test_cli_estimate_runs_in_seconds_without_weights(name):
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "services.cli", "check-config", "--estimate", "--config",
                          f"configs/{name}.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    assert took < 60, took  # seconds on a free machine; generous for a shared CI box
    out = res.stdout
    assert "total GPU" in out and "ZeRO 2" in out and "bfloat16" in out and "published config of" in out
    assert out == estimate_text(load_config(str(ROOT / "configs" / f"{name}.yaml"), []), out.splitlines()[0])
