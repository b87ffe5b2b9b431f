"""The KL reference the learner's ``beta_text`` / ``beta_img`` terms are measured against: the policy as it was
at ``snapshot_reference`` (the start of stage 2, after stage 1 when it ran), frozen.

- Full training: a second, plain (not DeepSpeed-managed) policy built from the config and loaded with the
  snapshot of the trainable weights (:class:`CopyReference`).
- LoRA (``model.lora``): no second model. The snapshot is only the adapter and head tensors, and the reference
  forward runs on the learner's own policy (:class:`LoraReference`): the heads (bridge, connector) are swapped
  to the snapshot for the pass and swapped back after it. The adapters: when the snapshot's adapters are the
  identity (every ``lora_B`` zero: stage 2 starts from the base, no stage 1 or a stage 1 that did not move
  them), the reference IS the base, and the pass runs with every adapter off (peft's ``enable_adapters(False)``).
  When stage 1 trained the adapters, the reference is the stage-1 policy (base + stage-1 adapter), not the base:
  the snapshot's adapter tensors are swapped in for the pass, like the heads. Either way the reference pass runs
  in eval mode (no LoRA dropout), and only ``snapshot`` (adapters + heads) is checkpointed.

The swap writes the snapshot into the parameters in place and restores the exact values (a copy taken just
before). Under ZeRO 3 the swapped parameters (adapters and heads: small) are gathered for the write and
re-partitioned after it (``deepspeed.zero.GatheredParameters`` with a modifier rank; every rank holds the same
snapshot), so the reference pass runs through ZeRO-3's own hooks like any forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from policy.factory import Policy, build_policy
from policy.lora import HEADS, adapters_are_identity
from policy.weights import tensor_sums


class _Reference:
    snapshot: dict[str, torch.Tensor]

    def weights_digest(self) -> dict[str, float]:
        """Per-tensor sums of the snapshot (to compare with a policy's ``weights_digest``)."""
        return tensor_sums(self.snapshot)


class CopyReference(_Reference):
    """A frozen plain copy of the policy (full training)."""

    def __init__(self, policy: Policy, snapshot: dict[str, torch.Tensor]) -> None:
        reference = build_policy(policy.cfg)
        reference.load_trainable(snapshot)
        self.model = reference.to(policy.device).eval().requires_grad_(False)

    @property
    def snapshot(self) -> dict[str, torch.Tensor]:
        """The trainable weights the reference holds (``kl_reference.safetensors``)."""
        return self.model.trainable_state_dict()

    @contextlib.contextmanager
    def applied(self) -> Iterator[Policy]:
        yield self.model


class LoraReference(_Reference):
    """The learner's own LoRA policy with the snapshot's heads, and its adapters off (the snapshot is the base)
    or the snapshot's adapters swapped in (the snapshot is a stage-1 policy)."""

    def __init__(self, policy: Policy, snapshot: dict[str, torch.Tensor]) -> None:
        own = policy.trainable_state_dict()
        if set(snapshot) != set(own):
            missing, extra = sorted(set(own) - set(snapshot)), sorted(set(snapshot) - set(own))
            raise ValueError(f"KL reference: the snapshot does not match this policy's adapters and heads "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        self.policy = policy
        self.snapshot = {k: v.detach().to(own[k].device, copy=True) for k, v in snapshot.items()}  # beside the weights
        self.is_base = adapters_are_identity(self.snapshot)
        self.swapped = [k for k in self.snapshot if k.startswith(HEADS) or not self.is_base]

    @contextlib.contextmanager
    def applied(self) -> Iterator[Policy]:
        """The policy as the reference, for the block (no gradients: the caller runs it under no_grad)."""
        p = self.policy
        params = dict(p.named_parameters())
        targets = [params[k] for k in self.swapped]
        with torch.no_grad(), _writable(targets):
            live = [t.detach().clone() for t in targets]
            for t, k in zip(targets, self.swapped, strict=True):
                t.copy_(self.snapshot[k])
        was_training = p.training
        p.eval()
        try:
            with p.lora.disabled(p) if self.is_base else contextlib.nullcontext():
                yield p
        finally:
            with torch.no_grad(), _writable(targets):
                for t, v in zip(targets, live, strict=True):
                    t.copy_(v)
            p.train(was_training)


@contextlib.contextmanager
def _writable(params: list[nn.Parameter]) -> Iterator[None]:
    """``params`` whole and writable in place for the block: under ZeRO 3 (partitioned parameters carry a
    ``ds_id``) gathered on every rank, rank 0's values re-partitioned on exit (every rank writes the same);
    otherwise as they are."""
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


def make_reference(policy: Policy, snapshot: dict[str, torch.Tensor]) -> CopyReference | LoraReference:
    """The KL reference of ``policy`` from a snapshot of its trainable weights."""
    return LoraReference(policy, snapshot) if getattr(policy, "lora", None) is not None else CopyReference(
        policy, snapshot)
