"""``unigrpo export``: a checkpoint's policy as a self-contained directory. A LoRA policy (adapters + heads,
its base named by the saved ``model`` section) is merged first (``policy.lora.merged``: ``W + (alpha / rank)
B A`` into every adapted layer, peft unloaded), so ``lm/`` loads with ``transformers`` and ``generator/`` with
``diffusers`` as they are, and the directory loads with ``policy.factory.load_policy_dir`` without the base."""

from __future__ import annotations

from pathlib import Path


def export(checkpoint: str, out: str) -> int:
    """Write the (merged) policy of ``checkpoint`` (a checkpoint or a policy directory) to ``out``."""
    from policy.factory import load_policy_dir
    from policy.lora import merged
    from services.cluster import policy_dir_of

    policy = load_policy_dir(policy_dir_of(checkpoint))
    adapted = getattr(policy, "lora", None) is not None
    merged(policy).save_pretrained(Path(out))
    print(f"wrote {out} ({'LoRA adapters merged into the base' if adapted else 'no adapters: saved as it is'})")
    return 0
