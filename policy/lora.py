"""LoRA on a policy (``model.lora``): peft adapters injected in place into its two sides, each a set of roots
the policy names (``lora_roots()``): the LM and the generator of a unified policy (``lm``, ``generator``);
Janus's language model (which understands and generates) and its generation aligner + head.

- **What trains**: the adapters (``lora_A`` / ``lora_B`` of every targeted linear layer) and a unified
  policy's fresh heads (bridge, connector). Every other weight is frozen, built once per replica from the ``model`` section (paths,
  or the tiny parts from ``model.seed``), and never synced or checkpointed.
- **The update**: a targeted ``W x`` becomes ``W x + (alpha / rank) * B A dropout(x)`` with ``A`` (rank x in)
  peft's Kaiming-uniform init and ``B`` (out x rank) zeros, so a fresh adapter is the identity on the base.
- **Targets**: ``model.lora.lm_target_modules`` / ``generator_target_modules`` are module-name suffixes matched
  as peft matches them (the name, or a name ending in ``.<target>``), among the linear layers under the side's
  roots. Every entry must
  match at least one layer, or the build fails naming the field. A VLM's vision tower is adapted only when
  ``model.train_vision_tower`` (its base stays frozen either way).
- **Names**: injection keeps the module classes (no ``PeftModel`` wrapper): a targeted ``q_proj`` becomes a
  peft ``LoraLayer`` with ``q_proj.base_layer.weight`` and ``q_proj.lora_A.default.weight`` /
  ``q_proj.lora_B.default.weight``. :meth:`Adapters.modules` maps each adapted module to its adapter tensors,
  what a weight sync verifies (``sync.manifest``).
- **Export**: :func:`merged` folds every adapter into its base weight (``W + (alpha / rank) B A``) and unloads
  peft, on a copy: the result saves plain transformers / diffusers directories.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from policy.config import LoraSettings, PolicyConfig

ADAPTER = "default"  # peft's adapter name
ADAPTERS_FILE = "adapters.safetensors"  # a LoRA policy directory's adapter weights (beside heads.safetensors)
HEADS = ("bridge.", "connector.")  # the fresh modules that train in full


Roots = dict[str, nn.Module]  # full name prefix in the policy -> the module under it (one side's roots)


def matches(name: str, target: str) -> bool:
    """peft's suffix rule: the module named ``target`` or ending in ``.target``."""
    return name == target or name.endswith("." + target)


def target_names(roots: Roots, targets: list[str], field: str, what: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Full names (``<root prefix>.<name>``) of the linear layers under ``roots`` that ``targets`` match (none
    under an ``exclude`` prefix). An entry that matches no layer raises ValueError naming ``field``."""
    linear = [f"{prefix}.{n}" for prefix, root in roots.items() for n, m in root.named_modules()
              if isinstance(m, nn.Linear) and not f"{prefix}.{n}".startswith(exclude)]
    names: list[str] = []
    for t in targets:
        hit = [n for n in linear if matches(n, t)]
        if not hit:
            tails = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ValueError(f"{field}: {t!r} matches no linear layer of the {what} (its linear layers end in "
                             f"{', '.join(tails[:24])}{', ...' if len(tails) > 24 else ''})")
        names += [n for n in hit if n not in names]
    return names


def lm_exclude(cfg: PolicyConfig) -> tuple[str, ...]:
    """Module prefixes of the LM no adapter goes to: a VLM's vision tower (``lm.model.visual``, as in
    ``UnifiedPolicy._frozen_prefixes``) unless ``model.train_vision_tower``."""
    return () if cfg.train_vision_tower else ("lm.model.visual.",)


def _peft_config(settings: LoraSettings, names: list[str]) -> LoraConfig:
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=names, bias="none")


def plan(cfg: PolicyConfig, sides: dict[str, Roots]) -> dict[str, list[str]]:
    """Per side (``lm``, ``generator``: the policy's ``lora_roots()``), the full names of the layers that get an
    adapter."""
    lo = cfg.lora
    return {
        "lm": target_names(sides["lm"], lo.lm_target_modules, "model.lora.lm_target_modules", "LM", lm_exclude(cfg)),
        "generator": target_names(sides["generator"], lo.generator_targets(cfg.arch, cfg.freeze_generator),
                                  "model.lora.generator_target_modules", "generator"),
    }


def adapter_params(sides: dict[str, Roots], names: list[str], rank: int) -> int:
    """Adapter parameters of the named layers: ``rank * (in + out)`` each."""
    roots = {p: r for side in sides.values() for p, r in side.items()}
    total = 0
    for name in names:
        prefix = next(p for p in roots if name.startswith(p + "."))
        m = roots[prefix].get_submodule(name[len(prefix) + 1:])
        total += rank * (m.in_features + m.out_features)
    return total


@dataclass(frozen=True)
class Adapters:
    """The adapters of one policy: per side, the full names (in the policy) of the adapted layers."""

    settings: LoraSettings
    layers: dict[str, list[str]]

    @classmethod
    def attach(cls, policy: nn.Module) -> Adapters:
        """Inject the adapters of ``policy.cfg.lora`` under ``policy.lora_roots()`` (in place); afterwards only
        the adapters and the heads (``HEADS``) require gradients."""
        sides = policy.lora_roots()
        layers = plan(policy.cfg, sides)
        for side, roots in sides.items():
            for prefix, root in roots.items():
                names = [n[len(prefix) + 1:] for n in layers[side] if n.startswith(prefix + ".")]
                if names:
                    inject_adapter_in_model(_peft_config(policy.cfg.lora, names), root, adapter_name=ADAPTER)
        for n, p in policy.named_parameters():
            p.requires_grad_(".lora_" in n or n.startswith(HEADS))
        return cls(policy.cfg.lora, layers)

    def lora_layers(self, policy: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
        """(full name, peft layer) of every adapted layer."""
        for names in self.layers.values():
            for n in names:
                yield n, policy.get_submodule(n)

    def modules(self, policy: nn.Module) -> dict[str, list[str]]:
        """Adapted module -> the names of its adapter tensors (``trainable_state_dict`` names)."""
        return {name: sorted(f"{name}.{pn}" for pn, _ in layer.named_parameters() if ".lora_" in f".{pn}")
                for name, layer in self.lora_layers(policy)}

    def trainable_state_dict(self, policy: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The adapter tensors and the heads (bridge, connector); tensors share storage with the model
        (``keep_vars``: the parameter objects themselves)."""
        return {k: v for k, v in policy.state_dict(keep_vars=keep_vars).items() if k.startswith(HEADS) or ".lora_" in k}

    @contextlib.contextmanager
    def disabled(self, policy: nn.Module):
        """The base model: every adapter off (peft's ``enable_adapters(False)``) inside the block."""
        layers = [layer for _, layer in self.lora_layers(policy)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def adapters_are_identity(state: dict[str, torch.Tensor]) -> bool:
    """Whether every adapter in ``state`` adds exactly zero: all ``lora_B`` zero (peft's init)."""
    return all(not bool(v.any()) for k, v in state.items() if ".lora_B." in k)


@torch.no_grad()
def merged_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every adapted linear layer of ``module`` with its adapter merged in, ``W + (alpha / rank) B
    A`` (peft's ``get_delta_weight``), under the plain (peft-free) name ``<layer>.weight``: what a replica that
    holds merged weights (vLLM) reloads after a sync; nothing else of the base ever changes."""
    return {f"{name}.weight": m.get_base_layer().weight + m.get_delta_weight(ADAPTER)
            for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as the module without peft would have it: adapters merged into their base
    weights (:func:`merged_weights`), ``.base_layer`` dropped from the names, no adapter tensors (what
    ``save_pretrained(state_dict=...)`` writes as a plain transformers directory)."""
    plain = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}
    return plain | merged_weights(module)


def _unload(model: nn.Module) -> None:
    """Merge each peft layer of ``model`` into its base layer and put the base layer back in its place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())


def merged(policy: nn.Module) -> nn.Module:
    """A copy of a LoRA ``policy`` with every adapter merged into its base weights and peft unloaded: plain
    transformers / diffusers modules, ``model.lora`` off (``save_pretrained`` then writes the full layout).
    A policy without adapters is returned as it is."""
    if getattr(policy, "lora", None) is None:
        return policy
    out = copy.deepcopy(policy)
    _unload(out)
    out.cfg = out.cfg.model_copy(update={"lora": LoraSettings()})
    out.lora = None
    return out
