"""Collate trajectories into the padded tensors one learner forward pass takes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from policy.trajectory import Trajectory
from policy.vision import empty_images, stack_images


@dataclass
class TrainBatch:
    """Right-padded token tensors (B, T) and the generated images' windows (S segments, W steps)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    behaviour_logp: torch.Tensor
    advantages: torch.Tensor  # (B,)
    slot_latents: torch.Tensor  # (N, C, h, w), row-major over the batch
    slot_counts: torch.Tensor  # (B,) long: slots of each row
    seg_rows: torch.Tensor  # (S,) long: which row each image segment belongs to
    seg_cond_end: torch.Tensor  # (S,) long
    seg_latents: torch.Tensor  # (S, W, C, h, w)
    seg_next_latents: torch.Tensor
    seg_sigmas: torch.Tensor  # (S, W)
    seg_sigma_nexts: torch.Tensor
    seg_log_probs: torch.Tensor  # (S, W) behaviour log-probs
    seg_final: torch.Tensor  # (S, C, h, w)
    row_group: torch.Tensor  # (B,) long: the prompt group of each row (0, 1, ... in order of appearance)
    row_weight: torch.Tensor  # (B,) 1 for a trajectory, 0 for a rank's padding row
    seg_weight: torch.Tensor  # (S,) 1 for an image segment, 0 for a padding row's
    vision_images: torch.Tensor = field(default_factory=empty_images)  # (M, H, W, 3) uint8, row-major: a VLM's
    vision_counts: torch.Tensor | None = None  # (B,) long: input images of each row (None: zeros)
    # (S, Tc) long, right-padded: each segment's own condition sequence, of length seg_cond_end (UAE: the caption
    # alone); Tc = 0 (None): every segment is conditioned on its row's prefix input_ids[row, :seg_cond_end]
    seg_cond_ids: torch.Tensor | None = None
    # (S,) long: where each segment's condition starts (ImageSegment.cond_start; None: zeros)
    seg_cond_start: torch.Tensor | None = None
    # (S,) the advantage of each segment's denoising steps (None: its row's, advantages[seg_rows]; a reward with
    # ``applies_to: denoising`` adds its own, ``services.step_batch``)
    seg_advantages: torch.Tensor | None = None

    def __post_init__(self) -> None:
        dev = self.input_ids.device
        if self.vision_counts is None:
            self.vision_counts = torch.zeros(self.input_ids.shape[0], dtype=torch.long, device=dev)
        if self.seg_cond_ids is None:
            self.seg_cond_ids = torch.zeros((self.seg_rows.shape[0], 0), dtype=torch.long, device=dev)
        if self.seg_cond_start is None:
            self.seg_cond_start = torch.zeros(self.seg_rows.shape[0], dtype=torch.long, device=dev)
        if self.seg_advantages is None:
            self.seg_advantages = self.advantages[self.seg_rows]

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_segments(self) -> int:
        return int(self.seg_rows.shape[0])

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with every tensor on ``device`` (the learner's model device)."""
        return TrainBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, rows: torch.Tensor) -> TrainBatch:
        """The mini-batch of the given rows (their slots and segments follow them)."""
        rows = rows.sort().values.to(self.input_ids.device)
        keep_row = torch.zeros(self.input_ids.shape[0], dtype=torch.bool, device=self.input_ids.device)
        keep_row[rows] = True
        slot_keep = torch.repeat_interleave(keep_row, self.slot_counts)
        seg_keep = keep_row[self.seg_rows]
        new_index = torch.full_like(keep_row, -1, dtype=torch.long)
        new_index[rows] = torch.arange(rows.numel(), device=rows.device)
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _ROW_FIELDS:
            kw[name] = kw[name][rows]
        kw["slot_latents"] = self.slot_latents[slot_keep]
        if self.vision_images.shape[0]:
            kw["vision_images"] = self.vision_images[torch.repeat_interleave(keep_row, self.vision_counts)]
        for name in _SEG_FIELDS:
            kw[name] = kw[name][seg_keep]
        kw["seg_rows"] = new_index[self.seg_rows[seg_keep]]
        return TrainBatch(**kw)

    def padding_rows(self, rows: torch.Tensor) -> TrainBatch:
        """The given rows as zero-weight padding: they run through every sub-module, add nothing to a loss."""
        sub = self.select(rows)
        sub.row_weight, sub.seg_weight = torch.zeros_like(sub.row_weight), torch.zeros_like(sub.seg_weight)
        return sub


_ROW_FIELDS = ("input_ids", "attention_mask", "loss_mask", "behaviour_logp", "advantages", "slot_counts", "row_group",
               "row_weight", "vision_counts")
_SEG_FIELDS = ("seg_cond_end", "seg_latents", "seg_next_latents", "seg_sigmas", "seg_sigma_nexts", "seg_log_probs",
               "seg_final", "seg_weight", "seg_cond_ids", "seg_cond_start", "seg_advantages")


def concat(batches: list[TrainBatch]) -> TrainBatch:
    """Rows of several batches of one token width, in order (slots and segments follow their rows)."""
    offsets = torch.tensor([0] + [b.num_rows for b in batches[:-1]]).cumsum(0).tolist()
    if len({b.seg_cond_ids.shape[1] for b in batches if b.num_segments}) > 1:
        raise ValueError("concat: the batches' segments condition on sequences of different widths")
    kw = {name: torch.cat([getattr(b, name) for b in batches]) for name in (*_ROW_FIELDS, *_SEG_FIELDS, "slot_latents")
          if name != "seg_cond_ids"}
    width = max(b.seg_cond_ids.shape[1] for b in batches)
    kw["seg_cond_ids"] = torch.cat([b.seg_cond_ids if b.seg_cond_ids.shape[1] == width
                                    else b.seg_cond_ids.new_zeros((0, width)) for b in batches])
    kw["seg_rows"] = torch.cat([b.seg_rows + off for b, off in zip(batches, offsets)])
    kw["vision_images"] = stack_images([b.vision_images for b in batches])
    return TrainBatch(**kw)


def collate(trajs: list[Trajectory], advantages: torch.Tensor, pad_id: int,
            image_advantages: torch.Tensor | None = None) -> TrainBatch:
    """Pad on the right; slot latents concatenated in row order; image segments stacked. ``image_advantages``
    (B,): the advantage of each row's denoising steps (None: ``advantages``)."""
    for adv in (advantages, image_advantages):
        if adv is not None and len(trajs) != adv.shape[0]:
            raise ValueError(f"{len(trajs)} trajectories but {adv.shape[0]} advantages")
    b, t = len(trajs), max(int(tr.input_ids.shape[0]) for tr in trajs)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    lmask = torch.zeros((b, t), dtype=torch.bool)
    blogp = torch.zeros((b, t))
    for i, tr in enumerate(trajs):
        n = tr.input_ids.shape[0]
        ids[i, :n], attn[i, :n] = tr.input_ids, 1
        lmask[i, :n], blogp[i, :n] = tr.loss_mask, tr.behaviour_logp
    segs = [(i, s) for i, tr in enumerate(trajs) for s in tr.images]
    own = [s.cond_ids is not None for _, s in segs]
    if any(own) and not all(own):
        raise ValueError("collate: some image segments carry their own condition sequence and some do not")
    cond_ids = torch.full((len(segs), max((s.cond_end for _, s in segs), default=0) if any(own) else 0), pad_id,
                          dtype=torch.long)
    for k, (_, s) in enumerate(segs):
        if s.cond_ids is not None:
            cond_ids[k, :s.cond_end] = s.cond_ids
    first_seen: dict[str, int] = {}
    latent_shape = trajs[0].slot_latents.shape[1:]
    if segs:
        stack = lambda name: torch.stack([getattr(s, name) for _, s in segs])  # noqa: E731
        seg = dict(
            seg_latents=stack("latents"), seg_next_latents=stack("next_latents"), seg_sigmas=stack("sigmas"),
            seg_sigma_nexts=stack("sigma_nexts"), seg_log_probs=stack("log_probs"), seg_final=stack("final_latent"),
        )
    else:
        empty = torch.zeros((0, 1, *latent_shape))
        seg = dict(seg_latents=empty, seg_next_latents=empty, seg_sigmas=torch.zeros(0, 1),
                   seg_sigma_nexts=torch.zeros(0, 1), seg_log_probs=torch.zeros(0, 1),
                   seg_final=torch.zeros((0, *latent_shape)))
    return TrainBatch(
        input_ids=ids, attention_mask=attn, loss_mask=lmask, behaviour_logp=blogp,
        advantages=advantages.float(), slot_latents=torch.cat([tr.slot_latents for tr in trajs]),
        slot_counts=torch.tensor([tr.slot_latents.shape[0] for tr in trajs], dtype=torch.long),
        seg_rows=torch.tensor([i for i, _ in segs], dtype=torch.long),
        seg_cond_end=torch.tensor([s.cond_end for _, s in segs], dtype=torch.long), **seg,
        row_group=torch.tensor([first_seen.setdefault(tr.prompt_id, len(first_seen)) for tr in trajs], dtype=torch.long),
        row_weight=torch.ones(b), seg_weight=torch.ones(len(segs)),
        vision_images=stack_images([tr.vision_images for tr in trajs]),
        vision_counts=torch.tensor([tr.vision_images.shape[0] for tr in trajs], dtype=torch.long),
        seg_cond_ids=cond_ids, seg_cond_start=torch.tensor([s.cond_start for _, s in segs], dtype=torch.long),
        seg_advantages=(advantages if image_advantages is None else image_advantages).float()[
            torch.tensor([i for i, _ in segs], dtype=torch.long)],
    )


def average_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over metric dicts (mini-batches, ranks); a key counts where it appears."""
    keys = set().union(*rows) if rows else set()
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
