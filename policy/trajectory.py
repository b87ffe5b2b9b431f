"""The trajectory schema: what a rollout worker returns and the learner trains on.

One trajectory is one sample of one prompt. Its token sequence holds the prompt and the response.
Image slots in the sequence are runs of ``n_image_tokens`` placeholder ids (``<img>``) between
``<img_start>`` and ``<img_end>``; the latent in each slot (the input image's, then any generated one)
is listed in ``slot_latents`` in order of appearance and enters the LM through the Latent
Representation Bridge. With a vision-language model, an input image the VLM's own tower reads is a run of
its ``<|image_pad|>`` tokens, and the raw image (uint8) is kept in ``vision_images`` (``policy.vision``).
A generated image also keeps the stochastic window of its SDE sampler, which is
what Flow-GRPO trains.

A Janus policy (``model.arch: janus``) generates an image as VQ-code tokens IN the sequence instead: they
are sampled tokens (``loss_mask`` True, behaviour log-probs kept), ``images`` stays empty and
``meta["generated_codes"]`` (n,) holds the codes (:meth:`Trajectory.generated` gives either kind).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from policy.vision import empty_images


def _to_wire(fields: dict) -> dict:
    """A dataclass's fields with CPU tensors as numpy arrays: pickling a small tensor costs ~10x a numpy
    array's (32 trajectories: 17-28 ms vs 3 ms per round trip through Ray). Other values, tensors on other
    devices and dtypes numpy lacks (bfloat16) pass through as they are."""
    out = {}
    for k, v in fields.items():
        if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype != torch.bfloat16:
            v = v.detach().numpy()
        out[k] = v
    return out


def _from_wire(state: dict) -> dict:
    """Inverse of :func:`_to_wire`; arrays Ray hands back read-only (zero-copy from its object store) are
    copied, so the tensors are ordinary writable ones."""
    return {k: torch.from_numpy(v if v.flags.writeable else v.copy()) if isinstance(v, np.ndarray) else v
            for k, v in state.items()}


class _WireTensors:
    """Pickles a dataclass's tensor fields as numpy arrays (``meta`` and other containers are left alone)."""

    def __getstate__(self) -> dict:
        return _to_wire(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(_from_wire(state))


@dataclass
class ImageSegment(_WireTensors):
    """One generated image: the trained SDE window and the final latent.

    The generator was conditioned on the LM's last hidden states of ``tokens[:cond_end]``, where ``tokens``
    is the trajectory's own sequence, or ``cond_ids`` when set: a sequence of its own (UAE reconstructs
    from the caption alone, read as a generation prompt without the image; then ``cond_end = len(cond_ids)``).
    The condition reads positions [``cond_start``, ``cond_end``): ``cond_start`` > 0 skips a Qwen-Image
    prompt template's system part (``policy.qwen_image.generation_prompt``).
    Shapes: latents / next_latents (W, C, h, w); sigmas / sigma_nexts / log_probs (W,); cond_ids (cond_end,).
    """

    cond_end: int
    latents: torch.Tensor
    next_latents: torch.Tensor
    sigmas: torch.Tensor
    sigma_nexts: torch.Tensor
    log_probs: torch.Tensor
    final_latent: torch.Tensor
    cond_ids: torch.Tensor | None = None
    cond_start: int = 0

    @property
    def window(self) -> int:
        return int(self.sigmas.shape[0])


@dataclass
class Trajectory(_WireTensors):
    """One sampled response with everything the learner needs to recompute and train on it."""

    prompt_id: str
    group_index: int
    input_ids: torch.Tensor  # (T,) long: prompt + response
    prompt_len: int
    loss_mask: torch.Tensor  # (T,) bool: True on tokens the policy sampled
    behaviour_logp: torch.Tensor  # (T,) float: log-prob of each sampled token when sampled, 0 elsewhere
    slot_latents: torch.Tensor  # (n_slots, C, h, w): latents of the image slots, in order
    images: list[ImageSegment] = field(default_factory=list)
    vision_images: torch.Tensor = field(default_factory=empty_images)  # (m, H, W, 3) uint8: a VLM tower's inputs
    policy_version: int = 0
    response_text: str = ""
    reward: float = float("nan")
    reward_components: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # task fields the reward needs (answer, choices, ...)

    @property
    def response_len(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def generated_image(self) -> bool:
        return len(self.images) > 0 or "generated_codes" in self.meta

    def generated(self) -> torch.Tensor | None:
        """What made the (first) generated image: its final latent (C,h,w), or Janus VQ codes (n,); None
        when nothing was generated. ``RolloutWorker.decode`` turns a batch of either into pixels."""
        if self.images:
            return self.images[0].final_latent
        return self.meta.get("generated_codes")

    def validate(self) -> None:
        t = self.input_ids.shape[0]
        if self.input_ids.dim() != 1 or self.input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be 1-D long, got {tuple(self.input_ids.shape)} {self.input_ids.dtype}")
        for name in ("loss_mask", "behaviour_logp"):
            v = getattr(self, name)
            if v.shape != (t,):
                raise ValueError(f"{name} must have shape ({t},), got {tuple(v.shape)}")
        for i, seg in enumerate(self.images):
            w = seg.window
            if seg.latents.shape != seg.next_latents.shape or seg.latents.shape[0] != w:
                raise ValueError(f"images[{i}]: latents/next_latents must be (W, C, h, w) with W={w}")
            if seg.cond_ids is not None:
                if seg.cond_ids.dim() != 1 or seg.cond_ids.dtype != torch.long or seg.cond_ids.shape[0] != seg.cond_end:
                    raise ValueError(f"images[{i}]: cond_ids must be 1-D long of length cond_end={seg.cond_end}")
            elif not (0 < seg.cond_end <= t):
                raise ValueError(f"images[{i}]: cond_end={seg.cond_end} outside the sequence of length {t}")
            if not 0 <= seg.cond_start < seg.cond_end:
                raise ValueError(f"images[{i}]: cond_start={seg.cond_start} not in [0, cond_end={seg.cond_end})")
