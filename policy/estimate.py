"""Parameter counts and a per-rank learner memory estimate of a ``model`` section, without weights.

Every part is built at full size on the meta device (shapes, no storage, no initialisation cost) from its
``config.json``: the configured directory's when it is on this machine, else the published config of a known
architecture (``policy.known_archs``, matched on the directory's name), else the tiny config. Nothing is read
but JSON files; nothing is downloaded.

Per learner rank (R ranks, ZeRO stage Z, w bytes per parameter of ``model.dtype``; P all parameters, T the
trainable ones; AdamW):

    weights      w * P (+ buffers)        / R under Z = 3 (DeepSpeed partitions every parameter it manages)
    gathered     w * min(P, 1e9)          under Z = 3: the parameters gathered at once, at most DeepSpeed's
                                          stage3_max_live_parameters (its default, 1e9)
    gradients    w * T                    / R under Z >= 2
    optimizer    (8 + 4 [bf16: fp32 master weights]) * T      / R under Z >= 1   (m and v in fp32)
    reference    w * P                    when a KL term is on (a plain frozen copy per rank); with LoRA w * T
                                          (the adapter and head snapshot: the base is the policy's own)
    activations  per part that gradients pass through (it trains, or a trained part is reached through it:
                 the image loss reaches a trained LM through a frozen generator; a frozen vision tower's
                 input needs no gradient, so it keeps nothing):
                 L * s * b * h * (34 without checkpointing, 2 with) + [checkpointing] 34 * s * b * h,
                 times w / 2, plus the LM's fp32 logits 4 * s * b * V    (Korthikanti et al. 2022, flash
                 attention: no s^2 term). LM: s = text + input-image tokens (a VLM's merged patches and / or a
                 bridge slot, ``model.input_image``) + a generated slot; vision tower: s = patches per image;
                 DiT: s = image + condition tokens, b = rows * window. Checkpointing: the LM's setting for the
                 LM and its tower, the generator's for the DiT.

With LoRA (``model.lora``) the base weights are frozen: T is the adapters (``rank * (in + out)`` per adapted
linear layer, parts ``lm.lora`` / ``generator.lora``) plus the fresh heads (bridge, connector), so gradients
and optimizer states are those of T alone; activations are still those of the whole adapted stack.

Offload (``learner.offload_optimizer``, Z >= 1): the optimizer line and the fp32 gradient partitions
4 * T / R move to host memory, and under Z >= 2 the device holds gradients only as DeepSpeed's reduce buckets
(at most w * 5e8, its reduce_bucket_size); ``learner.offload_params`` (Z = 3): the weights line moves to host
memory (the gathered line stays on the device). The activation line is an order of magnitude, not a bound:
it assumes ``b`` sequences of ``s`` tokens per micro-batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from policy.config import PolicyConfig
from policy.known_archs import KNOWN, known_config, known_key
from policy.pipeline import MODEL_INDEX, TEXT_ENCODERS

BYTES = {"float32": 4, "bfloat16": 2}
GIB = 1024**3
MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's stage3_max_live_parameters default: most parameters gathered at once
REDUCE_BUCKET = 5 * 10**8  # DeepSpeed's reduce_bucket_size default (elements)


@dataclass(frozen=True)
class Part:
    """One sub-model: its parameter count, whether it trains, and where its config came from; ``backprop``:
    whether gradients pass through it in backward (then its forward keeps activations), ``side``: whose
    gradient checkpointing setting applies (``understanding``: the LM's, ``generation``: the generator's)."""

    name: str
    params: int
    trainable: bool
    source: str
    layers: int = 0  # for the activation estimate: transformer depth, width, vocabulary, tokens per row
    width: int = 0
    vocab: int = 0
    tokens: int = 0
    rows_factor: int = 1
    buffers: int = 0  # persistent buffers (weights that are not parameters, e.g. SD3's positional embedding)
    backprop: bool = False
    side: str = "understanding"


@dataclass(frozen=True)
class MemorySettings:
    """The learner settings the estimate depends on (``services.cli`` fills them from the run config)."""

    ranks: int = 1
    zero_stage: int = 0
    dtype: str = "float32"
    gradient_checkpointing_lm: bool = False
    gradient_checkpointing_generator: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    kl_reference: bool = False
    rows_per_rank: int = 1  # trajectories per rank per micro-batch


@dataclass(frozen=True)
class Estimate:
    parts: list[Part]
    settings: MemorySettings
    lines: dict[str, float] = field(default_factory=dict)  # bytes per rank, by item
    host: float = 0.0  # bytes per rank offloaded to host memory

    @property
    def total_params(self) -> int:
        return sum(p.params for p in self.parts)

    @property
    def trainable_params(self) -> int:
        return sum(p.params for p in self.parts if p.trainable)

    @property
    def gpu_bytes(self) -> float:
        return sum(self.lines.values())


# ---------------------------------------------------------------------------------------------- configs
def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _config_of(path: str, sub: str | None, file: str = "config.json") -> tuple[dict[str, Any] | None, str]:
    """(config dict, where it came from) of a directory (or its subfolder), else of the known-architecture table."""
    d = Path(path).expanduser() / (sub or "")
    found = _read(d / file)
    if found is not None:
        return found, str(d / file)
    key = known_key(path, sub)
    return (None, "") if key is None else (KNOWN[key], f"published config of {key} (policy.known_archs)")


def _unknown(field_: str, path: str) -> ValueError:
    return ValueError(f"{field_}: {path} is not on this machine and its architecture is not in "
                      "policy.known_archs; put its config.json there to estimate it")


def _meta():
    return torch.device("meta")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _buffers(module: torch.nn.Module) -> int:
    """Elements of the persistent buffers (those ``state_dict`` saves)."""
    state = set(module.state_dict())
    return sum(b.numel() for n, b in module.named_buffers() if n in state)


def _diffusers_model(cls_name: str, config: dict[str, Any]) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, cls_name)
    with _meta():
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _lm_model(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    conf = dict(config)
    c = AutoConfig.for_model(conf.pop("model_type"), **conf)
    vl = any(a.endswith("ForConditionalGeneration") for a in config.get("architectures") or [])
    with _meta():
        return (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_config(c)


# ------------------------------------------------------------------------------------------------ parts
def _unified_models(cfg: PolicyConfig) -> tuple[torch.nn.Module, str, torch.nn.Module, str, torch.nn.Module, str]:
    """(LM, its config source, VAE, source, generator, source) at full size on the meta device."""
    from policy.build import vae_factor
    from policy.tokenizer import build_tiny_tokenizer

    # generator (a pipeline directory's transformer/, a transformer directory, or tiny) and VAE
    pipe = cfg.generator_path is not None and (
        (Path(cfg.generator_path).expanduser() / MODEL_INDEX).is_file() or known_config(cfg.generator_path, "vae"))
    direct = cfg.generator_class in TEXT_ENCODERS  # Qwen-Image: no connector; its pipeline's text encoder the LM
    # LM
    if cfg.lm_path or (pipe and direct):
        lm_conf, lm_src = _config_of(cfg.lm_path, None) if cfg.lm_path else _config_of(cfg.generator_path,
                                                                                         "text_encoder")
        if lm_conf is None:
            raise _unknown("model.lm_path", cfg.lm_path or f"{cfg.generator_path}/text_encoder")
    else:
        lm_conf = {"model_type": "qwen2", **cfg.lm_tiny_config(), "vocab_size": len(build_tiny_tokenizer())}
        lm_src = "tiny (model.lm_tiny)"
    lm = _lm_model(lm_conf)
    if cfg.vae_path or pipe:
        vae_conf, vae_src = _config_of(cfg.vae_path, None) if cfg.vae_path else _config_of(cfg.generator_path, "vae")
        if vae_conf is None:
            raise _unknown("model.vae_path", cfg.vae_path or f"{cfg.generator_path}/vae")
    else:
        vae_conf, vae_src = cfg.vae_tiny_config(), "tiny (model.vae_tiny)"
    vae = _diffusers_model(vae_conf.get("_class_name", "AutoencoderKL"), vae_conf)
    factor, channels = vae_factor(vae.config)
    side = cfg.image_size // factor  # the tiny generator's latent side
    if cfg.generator_path:
        gen_conf, gen_src = _config_of(cfg.generator_path, "transformer" if pipe else None)
        if gen_conf is None:
            raise _unknown("model.generator_path", cfg.generator_path)
    else:
        gen_conf, gen_src = cfg.generator_tiny_config(channels, side), "tiny (model.generator_tiny)"
    return lm, lm_src, vae, vae_src, _diffusers_model(cfg.generator_class, gen_conf), gen_src


def lora_plan(cfg: PolicyConfig) -> dict[str, list[str]]:
    """The layers ``model.lora`` adapts, per side, on the full-size parts; an entry that matches nothing raises
    ValueError naming its field (``check_paths`` runs this before a run starts)."""
    from policy.janus import lora_roots
    from policy.lora import plan
    from policy.model import unified_lora_roots

    if cfg.arch == "janus":
        return plan(cfg, lora_roots(_janus_model(cfg)[0], "model"))
    lm, _, _, _, gen, _ = _unified_models(cfg)
    return plan(cfg, unified_lora_roots(lm, gen))


def _adapter_parts(cfg: PolicyConfig, sides: dict[str, dict[str, torch.nn.Module]], train_lm: bool,
                   train_gen: bool) -> list[Part]:
    """One part per side that ``model.lora`` adapts: its adapter parameters."""
    from policy.lora import adapter_params, plan

    layers, r = plan(cfg, sides), cfg.lora.rank
    return [Part(f"{side}.lora", adapter_params(sides, layers[side], r), trains,
                 f"model.lora (rank {r}, {len(layers[side])} layers)", side=where)
            for side, trains, where in (("lm", train_lm, "understanding"), ("generator", train_gen, "generation"))
            if layers[side]]


def _unified_parts(cfg: PolicyConfig, train_lm: bool, train_gen: bool, text_tokens: int, window: int,
                   reads_generated: bool) -> list[Part]:
    """The parts of a unified policy. With LoRA the bases are frozen (their activations still count: gradients
    pass through them to the adapters) and the adapters are parts of their own."""
    from policy.bridge import Connector, LatentBridge
    from policy.build import vae_factor
    from policy.model import unified_lora_roots

    lm, lm_src, vae, vae_src, gen, gen_src = _unified_models(cfg)
    text = lm.config.get_text_config()
    hidden = int(text.hidden_size)
    tower = getattr(lm.model, "visual", None)  # a VLM's vision tower (policy.vision)
    factor, channels = vae_factor(vae.config)
    side = cfg.image_size // factor
    direct = cfg.generator_class in TEXT_ENCODERS  # Qwen-Image: no connector
    g = gen.config
    with _meta():
        bridge = LatentBridge(channels, side, cfg.bridge_patch, hidden)
        connector = None if direct else Connector(hidden, g.joint_attention_dim, g.pooled_projection_dim)
    gen_train = train_gen and not cfg.freeze_generator
    image_tokens = (side // int(g.get("patch_size") or 1)) ** 2 + cfg.cond_tokens
    gen_width = int(g.num_attention_heads) * int(g.attention_head_dim)
    mode = cfg.input_image or ("vision" if tower is not None else "bridge")
    input_tokens = bridge.n_tokens if mode in ("bridge", "both") else 0
    parts = []
    if tower is not None:
        v = lm.config.vision_config
        patches = _vision_patches(cfg.image_size, int(v.patch_size), int(v.spatial_merge_size))
        seen = mode in ("vision", "both")
        input_tokens += patches // int(v.spatial_merge_size) ** 2 if seen else 0
        tower_train = train_lm and cfg.train_vision_tower
        parts.append(Part("vision", _count(tower), tower_train, lm_src, int(v.depth), int(v.hidden_size), 0, patches,
                          backprop=tower_train and seen))
    lm_params = _count(lm) - (_count(tower) if tower is not None else 0)
    lora = cfg.lora.enabled
    adapters = []
    if lora:
        adapters = _adapter_parts(cfg, unified_lora_roots(lm, gen), train_lm, gen_train)
        parts = [Part(p.name, p.params, False, p.source, p.layers, p.width, p.vocab, p.tokens, p.rows_factor,
                      p.buffers, p.backprop, p.side) for p in parts]  # a tower adapts only when it trains
    parts = [
        Part("lm", lm_params, train_lm and not lora, lm_src, int(text.num_hidden_layers), hidden, int(text.vocab_size),
             text_tokens + input_tokens + (bridge.n_tokens if reads_generated else 0), backprop=train_lm),
        *parts,
        Part("bridge", _count(bridge), train_lm, "model.bridge_patch"),
        Part("generator", _count(gen), gen_train and not lora, gen_src, int(g.num_layers), gen_width, 0, image_tokens, window,
             _buffers(gen), backprop=gen_train or train_lm, side="generation"),
        Part("connector", _count(connector), gen_train, "model.cond_tokens", side="generation")
        if connector is not None else None,
        Part("vae", _count(vae), False, vae_src, side="generation"),
        *adapters,
    ]
    return [p for p in parts if p is not None]


def _vision_patches(image_size: int, patch: int, merge: int) -> int:
    """Patches of one ``image_size`` square image as a Qwen-VL processor cuts it: the side rounded to a multiple
    of patch * merge (its ``smart_resize``), then (side / patch)^2."""
    unit = patch * merge
    return (max(1, round(image_size / unit)) * merge) ** 2


def _janus_model(cfg: PolicyConfig) -> tuple[torch.nn.Module, str]:
    """The full-size Janus of ``cfg`` on the meta device, and where its config came from."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    if cfg.janus_path:
        conf, src = _config_of(cfg.janus_path, None)
        if conf is None:
            raise _unknown("model.janus_path", cfg.janus_path)
        jc = JanusConfig(**{k: v for k, v in conf.items() if k not in ("model_type", "architectures")})
    else:
        from policy.janus_tiny import tiny_janus_config
        from policy.tokenizer import build_tiny_tokenizer, special_token_ids

        tok = build_tiny_tokenizer()
        t = cfg.janus_tiny
        jc = tiny_janus_config(len(tok), special_token_ids(tok)["img"], t.get("text"), t.get("vision"), t.get("vq"))
        src = "tiny (model.janus_tiny)"
    with _meta():
        model = JanusForConditionalGeneration(jc)
    return model, src


def _janus_parts(cfg: PolicyConfig, train_lm: bool, train_gen: bool, text_tokens: int) -> list[Part]:
    """The parts of a Janus policy; with LoRA every base part is frozen and the adapters are parts of their own
    (the LM's activations still count: gradients pass through it to the adapters)."""
    from policy.janus import lora_roots

    model, src = _janus_model(cfg)
    m, jc = model.model, model.config
    text = jc.text_config
    lm = _count(m.language_model) + (0 if jc.tie_word_embeddings else _count(model.lm_head))
    n_codes = int(jc.vq_config.num_patches) ** 2
    full = not cfg.lora.enabled
    train_gen = train_gen and not cfg.freeze_generator
    adapters = _adapter_parts(cfg, lora_roots(model, "model"), train_lm, train_gen) if cfg.lora.enabled else []
    return [
        Part("janus.lm", lm, train_lm and full, src, int(text.num_hidden_layers), int(text.hidden_size),
             int(text.vocab_size), text_tokens + n_codes, backprop=train_lm or train_gen),
        Part("janus.vision", _count(m.vision_model) + _count(m.aligner), train_lm and full, src),
        Part("janus.generation", sum(_count(x) for x in (m.generation_embeddings, m.generation_aligner,
                                                        m.generation_head)), train_gen and full, src, side="generation"),
        Part("janus.vq", _count(m.vqmodel), False, src, side="generation"),
        *adapters,
    ]


def model_parts(cfg: PolicyConfig, train_lm: bool = True, train_generator: bool = True, text_tokens: int = 128,
                window: int = 1, reads_generated: bool = True) -> list[Part]:
    """The parts of ``cfg``'s policy at full size (meta device). ``text_tokens``: text per trajectory (prompt +
    response) for the activation estimate; ``window``: SDE steps per image the learner recomputes;
    ``reads_generated``: the LM reads the generated image back through the bridge (CLEAR's answer after it),
    so its slot counts in the LM's tokens."""
    if cfg.arch == "janus":
        return _janus_parts(cfg, train_lm, train_generator, text_tokens)
    return _unified_parts(cfg, train_lm, train_generator, text_tokens, window, reads_generated)


# ----------------------------------------------------------------------------------------------- memory
def _activations(p: Part, s: MemorySettings, w: int) -> float:
    if not (p.backprop and p.layers):
        return 0.0
    ckpt = s.gradient_checkpointing_lm if p.side == "understanding" else s.gradient_checkpointing_generator
    rows = s.rows_per_rank * p.rows_factor
    sbh = p.tokens * rows * p.width
    per_layer = (2 if ckpt else 34) * w / 2
    act = p.layers * sbh * per_layer + (34 * w / 2 * sbh if ckpt else 0)
    return act + 4.0 * p.tokens * rows * p.vocab


def estimate_memory(parts: list[Part], s: MemorySettings) -> Estimate:
    """Bytes per learner rank by item (see the module docstring) for these parts and settings."""
    w = BYTES[s.dtype]
    total = sum(p.params + p.buffers for p in parts)
    trainable = sum(p.params for p in parts if p.trainable)
    r = max(1, s.ranks)
    weights = w * total / (r if s.zero_stage >= 3 else 1)
    gathered = w * min(total, MAX_LIVE_PARAMETERS) if s.zero_stage >= 3 else 0.0
    grads = w * trainable / (r if s.zero_stage >= 2 else 1)
    optim = (8 + (4 if w == 2 else 0)) * trainable / (r if s.zero_stage >= 1 else 1)
    host = 0.0
    if s.offload_optimizer and s.zero_stage >= 1:
        host += optim + 4.0 * trainable / r  # states + fp32 gradient partitions
        optim = 0.0
        if s.zero_stage >= 2:
            grads = min(grads, float(w * REDUCE_BUCKET))
    if s.offload_params and s.zero_stage >= 3:
        host, weights = host + weights, 0.0
    lora = any(p.name.endswith(".lora") for p in parts)
    lines = {"weights": weights, "gathered": gathered, "gradients": grads, "optimizer": optim,
             "reference": (w * (trainable if lora else total)) if s.kl_reference else 0.0,
             "activations": sum(_activations(p, s, w) for p in parts)}
    return Estimate(parts, s, lines, host)


# ------------------------------------------------------------------------------------------------ table
def _si(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_estimate(e: Estimate, title: str = "") -> str:
    """The parts table and the per-rank memory lines, as plain text (one run's ``check-config --estimate``)."""
    s = e.settings
    rows = [("part", "params", "trains", "config from")]
    rows += [(p.name, _si(p.params), "yes" if p.trainable else "no", p.source) for p in e.parts]
    rows.append(("total", _si(e.total_params), _si(e.trainable_params), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = [title] if title else []
    out += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    out.append("")
    out.append(f"learner memory per rank: {s.ranks} rank(s), ZeRO {s.zero_stage}, {s.dtype}"
               f"{' + fp32 master weights' if s.dtype == 'bfloat16' else ''}, gradient checkpointing: LM "
               f"{'on' if s.gradient_checkpointing_lm else 'off'}, generator "
               f"{'on' if s.gradient_checkpointing_generator else 'off'}, offload: optimizer "
               f"{'on' if s.offload_optimizer else 'off'}, parameters {'on' if s.offload_params else 'off'}; "
               f"LoRA: {_lora_text(e.parts)}; {s.rows_per_rank} trajectory(ies) per micro-batch")
    for k, v in e.lines.items():
        out.append(f"  {k:<12} {v / GIB:8.2f} GiB")
    out.append(f"  {'total GPU':<12} {e.gpu_bytes / GIB:8.2f} GiB")
    if e.host:
        out.append(f"  {'host (offload)':<12} {e.host / GIB:6.2f} GiB")
    return "\n".join(out) + "\n"


def _lora_text(parts: list[Part]) -> str:
    adapters = [p for p in parts if p.name.endswith(".lora")]
    if not adapters:
        return "off (full-model training)"
    return "on, " + ", ".join(f"{p.name} {_si(p.params)}" for p in adapters) + " (bases frozen)"


def rows_per_rank(batch: int, ranks: int, mini_batches: int) -> int:
    """Trajectories one rank holds in one micro-batch: ceil(batch / (ranks * mini_batches))."""
    return max(1, math.ceil(batch / (max(1, ranks) * max(1, mini_batches))))


__all__ = ["Estimate", "MemorySettings", "Part", "estimate_memory", "format_estimate", "model_parts", "rows_per_rank"]
