"""``unigrpo check-config --estimate``: every part at full size on the meta device, no weights (policy/estimate.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from policy.config import PolicyConfig
from policy.estimate import (
    GIB,
    MAX_LIVE_PARAMETERS,
    REDUCE_BUCKET,
    MemorySettings,
    estimate_memory,
    model_parts,
)
from policy.known_archs import PUBLISHED_PARAMS
from policy.model import UnifiedPolicy
from services.config import load_config
from services.estimate import estimate_text

ROOT = Path(__file__).resolve().parents[1]
REAL = ["clear_qwen25_sd35", "clear_qwen25vl_sd35", "uae_qwen25vl_sd35", "uae_qwen_image", "gvu_janus"]


def _parts(name: str) -> dict:
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"), [])
    return {p.name: p for p in model_parts(cfg.model)}


@pytest.mark.parametrize("name,part,arch", [
    ("uae_qwen25vl_sd35", ("lm", "vision"), "Qwen2.5-VL-7B-Instruct"),
    ("clear_qwen25_sd35", "lm", "Qwen2.5-7B-Instruct"),
    ("gvu_janus", None, "Janus-Pro-7B"),
    ("clear_qwen25_sd35", "generator", "stable-diffusion-3.5-medium/transformer"),
    ("uae_qwen_image", "lm", "Qwen2.5-VL-7B-Instruct"),  # the pipeline's text encoder
    ("uae_qwen_image", "generator", "Qwen-Image/transformer"),
])
def test_real_scale_parameter_counts_match_published_sizes(name, part, arch):
    parts = _parts(name)
    names = list(parts) if part is None else [part] if isinstance(part, str) else list(part)
    n = sum(parts[k].params + parts[k].buffers for k in names)
    assert abs(n / PUBLISHED_PARAMS[arch] - 1) < 0.10, (arch, n)


def test_frozen_parts_follow_the_config():
    uae = _parts("uae_qwen25vl_sd35")  # model.freeze_generator: the generator side is part of the reward
    assert uae["lm"].trainable and not uae["generator"].trainable and not uae["connector"].trainable
    assert not uae["vae"].trainable and not _parts("gvu_janus")["janus.vq"].trainable


def test_qwen_image_pipeline_is_one_model_without_a_connector():
    parts = _parts("uae_qwen_image")
    # no connector: the transformer reads the LM's hidden states; the text encoder's tower is a frozen part
    assert set(parts) == {"lm", "vision", "bridge", "generator", "vae"} and not parts["vision"].trainable
    assert "Qwen-Image/text_encoder" in parts["lm"].source and "Qwen-Image/vae" in parts["vae"].source
    assert parts["lm"].trainable and not parts["generator"].trainable
    assert parts["generator"].tokens == (512 // 8 // 2) ** 2 + 264  # packed 2 x 2 latent tokens + condition
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
    assert z0.lines["optimizer"] == 12 * p_train and z0.lines["gathered"] == 0  # fp32 m, v and master weights
    z3 = estimate_memory(list(parts.values()), MemorySettings(ranks=4, zero_stage=3, dtype="bfloat16"))
    assert z3.lines["weights"] == 2 * p_all / 4 and z3.lines["gradients"] == 2 * p_train / 4
    assert z3.lines["optimizer"] == 12 * p_train / 4 and z3.host == 0
    assert z3.lines["gathered"] == 2 * min(p_all, MAX_LIVE_PARAMETERS)
    fp32 = estimate_memory(list(parts.values()), MemorySettings(ranks=1, zero_stage=0, dtype="float32"))
    assert fp32.lines["optimizer"] == 8 * p_train and fp32.lines["weights"] == 4 * p_all
    assert 50 * GIB < z0.gpu_bytes  # a 10B model does not fit a rank without sharding


def test_offload_moves_states_and_parameters_to_the_host():
    parts = list(_parts("clear_qwen25_sd35").values())
    p_all = sum(p.params + p.buffers for p in parts)
    p_train = sum(p.params for p in parts if p.trainable)
    on = lambda **kw: estimate_memory(parts, MemorySettings(ranks=4, dtype="bfloat16", **kw))  # noqa: E731
    z3 = on(zero_stage=3)
    opt = on(zero_stage=3, offload_optimizer=True)
    assert opt.lines["optimizer"] == 0 and opt.host == 12 * p_train / 4 + 4 * p_train / 4  # + fp32 grad partitions
    assert opt.lines["gradients"] == min(2 * p_train / 4, 2 * REDUCE_BUCKET) <= z3.lines["gradients"]
    both = on(zero_stage=3, offload_optimizer=True, offload_params=True)
    assert both.lines["weights"] == 0 and both.host == opt.host + 2 * p_all / 4
    assert both.lines["gathered"] == z3.lines["gathered"] > 0  # a layer still runs on the device
    assert both.gpu_bytes < opt.gpu_bytes < z3.gpu_bytes
    assert z3.gpu_bytes - both.gpu_bytes == pytest.approx(both.host - z3.host - 4 * p_train / 4
                                                          + (z3.lines["gradients"] - opt.lines["gradients"]))
    z1 = on(zero_stage=1, offload_optimizer=True)  # ZeRO 1 keeps whole gradients on the device
    assert z1.lines["gradients"] == 2 * p_train and z1.host == opt.host


def test_checkpointing_shrinks_each_sides_activations():
    parts = _parts("clear_qwen25_sd35")
    lm, gen = parts["lm"], parts["generator"]
    s = dict(ranks=4, zero_stage=2, dtype="bfloat16", rows_per_rank=3)

    def act(part, **kw):
        return estimate_memory([part], MemorySettings(**s, **kw)).lines["activations"]

    def expected(p, rows, ckpt):  # bf16: w / 2 = 1
        sbh = p.tokens * rows * p.width
        return p.layers * sbh * (2 if ckpt else 34) + (34 * sbh if ckpt else 0) + 4 * p.tokens * rows * p.vocab

    assert act(lm) == expected(lm, 3, False) and act(lm, gradient_checkpointing_lm=True) == expected(lm, 3, True)
    assert act(lm, gradient_checkpointing_generator=True) == act(lm)  # the generator's setting is not the LM's
    assert act(gen) == expected(gen, 3 * gen.rows_factor, False)
    assert act(gen, gradient_checkpointing_generator=True) == expected(gen, 3 * gen.rows_factor, True) < act(gen)
    assert act(gen, gradient_checkpointing_lm=True) == act(gen)
    whole = lambda **kw: estimate_memory(list(parts.values()), MemorySettings(**s, **kw))  # noqa: E731
    assert (whole().lines["activations"] - whole(gradient_checkpointing_lm=True).lines["activations"]
            == act(lm) - act(lm, gradient_checkpointing_lm=True))


def test_frozen_vision_tower_is_frozen_in_the_estimate():
    """``model.train_vision_tower: false``: the VLM's tower is its own part, not trainable, and keeps no
    activations; training it adds exactly its parameters to the trainable count and their states."""
    cfg = load_config(str(ROOT / "configs" / "uae_qwen25vl_sd35.yaml"), [])
    assert cfg.model.train_vision_tower is False
    s = MemorySettings(ranks=4, zero_stage=2, dtype="bfloat16", rows_per_rank=2)
    frozen = {p.name: p for p in model_parts(cfg.model)}
    trained = {p.name: p for p in model_parts(cfg.model.model_copy(update={"train_vision_tower": True}))}
    tower = frozen["vision"].params
    assert not frozen["vision"].trainable and frozen["lm"].trainable and trained["vision"].trainable
    assert 0.5e9 < tower < 0.8e9  # Qwen2.5-VL-7B's ViT
    f, t = estimate_memory(list(frozen.values()), s), estimate_memory(list(trained.values()), s)
    assert t.trainable_params - f.trainable_params == tower and t.total_params == f.total_params
    assert t.lines["optimizer"] - f.lines["optimizer"] == 12 * tower / 4
    assert t.lines["gradients"] - f.lines["gradients"] == 2 * tower / 4
    assert f.lines["weights"] == t.lines["weights"]
    v = trained["vision"]
    assert t.lines["activations"] - f.lines["activations"] == 34 * v.layers * v.tokens * 2 * v.width


def test_a_vl_directorys_parts_equal_the_built_policy(tmp_path):
    from vlm_dirs import save_qwen25_vl

    vl = save_qwen25_vl(tmp_path / "vl")
    cfg = PolicyConfig(lm_path=str(vl), cond_tokens=8)
    parts = {p.name: p.params for p in model_parts(cfg)}
    policy = UnifiedPolicy.from_config(cfg)
    tower = sum(p.numel() for p in policy.vision.tower.parameters())
    assert parts["vision"] == tower
    # the policy adds its special tokens to the tiny directory's exact-size vocabulary (embeddings + head rows)
    saved = json.loads((vl / "config.json").read_text())["text_config"]["vocab_size"]
    added = 2 * policy.lm_config.hidden_size * (policy.lm.get_input_embeddings().num_embeddings - saved)
    assert added > 0
    assert parts["lm"] + added == sum(p.numel() for p in policy.lm.parameters()) - tower


@pytest.mark.parametrize("name", REAL)
def test_cli_estimate_runs_in_seconds_without_weights(name):
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "services.cli", "check-config", "--estimate", "--config",
                          f"configs/{name}.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    assert took < 60, took  # seconds on a free machine; generous for a shared CI box
    out = res.stdout
    stage = load_config(str(ROOT / "configs" / f"{name}.yaml"), []).learner.zero_stage
    assert "total GPU" in out and f"ZeRO {stage}" in out and "bfloat16" in out and "published config of" in out
    assert out == estimate_text(load_config(str(ROOT / "configs" / f"{name}.yaml"), []), out.splitlines()[0])
