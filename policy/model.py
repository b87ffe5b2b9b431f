"""UnifiedPolicy: the one model rollout workers and the learner both run.

LM (understanding, text) + generator (flow-matching DiT) + frozen VAE, joined by two small trainable
heads: the Latent Representation Bridge (latent -> LM tokens at ``<img>`` placeholders) and the
connector (LM hidden states -> generator conditioning). When ``model.lm_path`` is a vision-language model the
input image may instead (or also) go through its own processor and vision tower (``policy.vision``,
``model.input_image``); generated latents always enter through the bridge. The sampler's sigmas are the pipeline scheduler's
(``sigmas``) when the generator comes from a diffusers pipeline directory. Qwen-Image (``policy.qwen_image``)
has no connector: its transformer reads the LM's hidden states directly, with their mask. See docs/CONTRACTS.md
"policy/".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policy import qwen_image
from policy.bridge import Connector, LatentBridge, positions_from_mask
from policy.build import (
    build_generator,
    build_image_processor,
    build_lm,
    build_schedule,
    build_tokenizer,
    build_vae,
    latent_geometry,
    torch_dtype,
)
from policy.config import PolicyConfig
from policy.lora import Adapters
from policy.persist import load_policy, save_policy
from policy.pipeline import FlowSchedule
from policy.prompting import image_slot
from policy.sde import flow_sigmas
from policy.tokenizer import special_token_ids
from policy.vision import LMInputs, VisionSide, cache_keyword, empty_images, input_image_mode, next_positions
from policy.weights import load_named_tensors, tensor_sums


class UnifiedPolicy(nn.Module):
    """LM + generator + VAE + bridge + connector. Built in eval mode; call ``.train()`` to train."""

    arch = "unified"  # PolicyConfig.arch (policy.factory.build_policy builds this class for it)

    def __init__(self, cfg: PolicyConfig, tokenizer, lm: nn.Module, generator: nn.Module, vae: nn.Module,
                 schedule: FlowSchedule | None = None, image_processor: Any = None):
        super().__init__()
        self.cfg = cfg
        self.schedule = schedule  # the pipeline scheduler's sigmas; None: policy.sde.flow_sigmas
        self.tokenizer = tokenizer
        self.lm = lm
        self.generator = generator
        self.vae = vae
        # a VLM's processor / tower / rope positions (None: a causal LM); not a sub-module (lm holds the tower)
        self.vision = VisionSide(lm, image_processor) if image_processor is not None else None
        self.input_image_mode = input_image_mode(cfg, self.vision is not None)
        self._cache_kwarg = cache_keyword(lm.base_model)  # without a vision side (a VLM text-only: Qwen-Image's)
        if self._tower_frozen():
            lm.model.visual.requires_grad_(False)
        dtype = torch_dtype(cfg)
        hidden = int(lm.config.get_text_config().hidden_size)
        channels, side = latent_geometry(cfg, vae)
        self.bridge = LatentBridge(channels, side, cfg.bridge_patch, hidden).to(dtype)
        gcfg = generator.config
        self.connector: Connector | None = None  # Qwen-Image: the LM's hidden states condition it directly
        if qwen_image.is_qwen_image(cfg.generator_class):
            qwen_image.check_transformer(generator, hidden)
        else:
            try:
                joint, pooled = int(gcfg.joint_attention_dim), int(gcfg.pooled_projection_dim)
            except AttributeError as e:
                raise ValueError(f"model.generator_class: {cfg.generator_class} has no joint/pooled dims") from e
            self.connector = Connector(hidden, joint, pooled).to(dtype)
        self.token_ids: dict[str, int] = special_token_ids(tokenizer)
        if self.vision is not None:
            self.token_ids |= self.vision.token_ids()
        self.lora = Adapters.attach(self) if cfg.lora.enabled else None  # model.lora: peft adapters (policy.lora)
        self.eval()

    # ---- construction / persistence -----------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: PolicyConfig) -> UnifiedPolicy:
        """Tiny parts from configs (random init seeded by ``cfg.seed``), others from local paths."""
        cfg.check_paths()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            tokenizer = build_tokenizer(cfg)
            lm = build_lm(cfg, len(tokenizer))
            vae = build_vae(cfg)
            channels, side = latent_geometry(cfg, vae)
            generator = build_generator(cfg, channels, side)
            return cls(cfg, tokenizer, lm, generator, vae, build_schedule(cfg), build_image_processor(cfg))

    def save_pretrained(self, directory: str | Path) -> None:
        """The policy directory (``policy.persist.save_policy``: config.json, tokenizer, weights or adapters)."""
        save_policy(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> UnifiedPolicy:
        """Load what :meth:`save_pretrained` wrote (local files only, no network)."""
        return load_policy(cls, directory)

    def train(self, mode: bool = True) -> UnifiedPolicy:
        super().train(mode)
        self.vae.eval()  # frozen, always eval
        return self

    # ---- shapes and ids -----------------------------------------------------------------------
    @property
    def n_image_tokens(self) -> int:
        return self.bridge.n_tokens

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.bridge.latent_channels, self.bridge.latent_side, self.bridge.latent_side)

    @property
    def image_seq_len(self) -> int:
        """Generator tokens of one latent: (latent side / patch size)^2 (the schedule's resolution input)."""
        patch = int(self.generator.config.get("patch_size") or 1)
        return (self.bridge.latent_side // patch) ** 2

    def sigmas(self, steps: int) -> torch.Tensor:
        """The sampler's K + 1 sigmas from 1 to 0 for ``steps`` steps: the pipeline scheduler's
        (``policy.sde.scheduler_sigmas``, its shift), else the unshifted ``policy.sde.flow_sigmas``."""
        if self.schedule is None:
            return flow_sigmas(steps)
        return self.schedule.sigmas(steps, self.image_seq_len)

    @property
    def device(self) -> torch.device:
        return self.bridge.pos.device

    @property
    def lm_config(self) -> Any:
        """The language model's transformers config (a VLM's text config)."""
        return self.lm.config.get_text_config()

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states (..., H) -> logits (..., V)."""
        return self.lm.get_output_embeddings()(hidden)

    def image_placeholder_ids(self) -> list[int]:
        """Token ids of one image slot: ``<img_start> <img>*n <img_end>``."""
        t = self.token_ids
        return [t["img_start"]] + [t["img"]] * self.n_image_tokens + [t["img_end"]]

    # ---- LM side ------------------------------------------------------------------------------
    def input_image(self, image) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """One input image (H, W, 3) uint8 as the prompt sees it (``model.input_image``): (its token run,
        its slot latents (n, C, h, w) for the bridge, its vision images (m, H, W, 3) uint8 for the VLM tower).
        ``bridge``: ``<img_start> <img>*n <img_end>``; ``vision``: the VLM's ``<|vision_start|> <|image_pad|>*n
        <|vision_end|>`` (the image read at ``model.image_size`` square); ``both``: the vision run, then the bridge
        slot (CLEAR stage 1)."""
        return self.input_images([image])[0]

    def input_images(self, images: list) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """:meth:`input_image` of each image, the bridge latents from ONE VAE pass over all of them (under
        ZeRO-3 every rank must run each sub-module equally often, whatever its share of images)."""
        out = [([], torch.zeros((0, *self.latent_shape)), empty_images()) for _ in images]
        if self.input_image_mode in ("vision", "both"):
            for k, image in enumerate(images):
                vision = self.vision.sized(image, self.cfg.image_size)[None]
                out[k] = (self.vision.slot(vision[0]), out[k][1], vision)
        if self.input_image_mode in ("bridge", "both") and images:
            # (H, W, 3) uint8 tensors, or arrays (read-only from a batch: copied)
            hwc = [x if isinstance(x, torch.Tensor) else torch.tensor(x) for x in images]
            pixels = torch.stack([x.permute(2, 0, 1) for x in hwc]).float() / 255.0
            latents = self.encode_image(pixels).cpu()  # trajectories hold CPU tensors
            slot = image_slot(self.token_ids, self.n_image_tokens)
            out = [(tokens + slot, latents[k : k + 1], vision) for k, (tokens, _, vision) in enumerate(out)]
        return out

    def lm_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  slot_latents: torch.Tensor | None = None, images: torch.Tensor | None = None) -> LMInputs:
        """What one LM call on ``input_ids`` takes: embeddings (bridge at ``<img>``; a VLM's tower at
        ``<|image_pad|>`` from ``images`` (M, H, W, 3) uint8), position ids (a VLM's multimodal rope positions,
        else ``cumsum(mask) - 1``) and extra text-model arguments (Qwen3-VL's deepstack features)."""
        embeds = self.embed(input_ids, slot_latents)
        if self.vision is None:
            if images is not None and images.shape[0]:
                raise ValueError("lm_inputs: vision images given, but model.lm_path is not a vision-language model")
            return LMInputs(embeds, positions_from_mask(attention_mask), {}, None)
        feats = self.vision.features(images, self.device) if images is not None and images.shape[0] else None
        embeds, extra = self.vision.scatter(input_ids, embeds, feats)
        pos, delta = self.vision.positions(input_ids, attention_mask, None if feats is None else feats.grid)
        return LMInputs(embeds, pos, extra, delta)

    def lm_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  slot_latents: torch.Tensor | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden states (B, T, H) of the padded batch (no LM head, no cache)."""
        inp = self.lm_inputs(input_ids, attention_mask, slot_latents, images)
        return self.lm_step(inp.embeds, attention_mask, inp.position_ids, use_cache=False, head=False,
                            extra=inp.extra)[1]

    def embed(self, input_ids: torch.Tensor, slot_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with ``bridge(latent)`` at ``<img>`` positions, in row-major batch order."""
        emb = self.lm.get_input_embeddings()(input_ids)
        mask = input_ids == self.token_ids["img"]
        n_placeholders = int(mask.sum())
        n_latents = 0 if slot_latents is None else int(slot_latents.shape[0])
        if n_placeholders != n_latents * self.n_image_tokens:
            raise ValueError(
                f"embed: {n_placeholders} <img> placeholders in input_ids, but {n_latents} latent(s) x "
                f"{self.n_image_tokens} image tokens = {n_latents * self.n_image_tokens}"
            )
        if n_placeholders == 0:
            return emb
        tokens = self.bridge(slot_latents).reshape(-1, emb.shape[-1]).to(emb.dtype)
        return emb.masked_scatter(mask.unsqueeze(-1), tokens)

    def lm_step(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = True,
        last_only: bool = False,
        head: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, object]:
        """One LM call on embeddings. ``attention_mask`` covers past + new tokens (B, P+T); positions
        default to ``cumsum(mask) - 1`` of the new tokens (text-only rope positions for a VLM). Returns
        (logits (B,T,V), hidden (B,T,H), cache); ``last_only``: logits of the last position only (B,1,V),
        the LM head skips the rest (sampling); ``head=False``: no logits (None): the caller applies the head
        where it needs it (the learner). ``extra``: :meth:`lm_inputs`' text-model arguments."""
        if position_ids is None:
            position_ids = next_positions(attention_mask, None if self.vision is None else
                                          torch.zeros(attention_mask.shape[0], dtype=torch.long),
                                          inputs_embeds.shape[1])
        if self.vision is None:
            body, cache_kwarg = self.lm.base_model, self._cache_kwarg
        else:
            body, cache_kwarg = self.vision.text_model, self.vision.cache_kwarg
        out = body(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache or past_key_values is not None,
            **{cache_kwarg: past_key_values},
            **(extra or {}),
        )
        hidden = out.last_hidden_state
        if not head:
            return None, hidden, out.past_key_values
        return self.text_logits(hidden[:, -1:] if last_only else hidden), hidden, out.past_key_values

    def lm_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slot_latents: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B,T,V), last hidden (B,T,H)); positions from the mask (and ``images``, a VLM's input
        images, :meth:`lm_inputs`). A passed cache is updated in place (``attention_mask`` then covers past
        + new tokens; positions then start at the cache's end: text only)."""
        if past_key_values is not None:
            logits, hidden, _ = self.lm_step(self.embed(input_ids, slot_latents), attention_mask,
                                             past_key_values=past_key_values, use_cache=use_cache)
            return logits, hidden
        inp = self.lm_inputs(input_ids, attention_mask, slot_latents, images)
        logits, hidden, _ = self.lm_step(inp.embeds, attention_mask, inp.position_ids, use_cache=use_cache,
                                         extra=inp.extra)
        return logits, hidden

    def token_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slot_latents: torch.Tensor | None = None,
        temperature: float = 1.0,
        vision_images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logp[:, t] = log p(input_ids[:, t] | < t)`` in float32; 0 at t=0, on padding and on a
        row's first real token. Returns (logp (B,T), hidden (B,T,H))."""
        logits, hidden = self.lm_forward(input_ids, attention_mask, slot_latents, images=vision_images)
        lg = logits[:, :-1].float() / temperature
        target = input_ids[:, 1:].unsqueeze(-1)
        lp = lg.gather(-1, target).squeeze(-1) - torch.logsumexp(lg, dim=-1)
        m = attention_mask.bool()
        lp = torch.where(m[:, 1:] & m[:, :-1], lp, torch.zeros_like(lp))
        return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1), hidden

    # ---- generator side -----------------------------------------------------------------------
    def condition(
        self,
        hidden: torch.Tensor,
        cond_end: torch.Tensor | list[int] | int,
        attention_mask: torch.Tensor | None = None,
        cond_start: torch.Tensor | list[int] | int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last ``cond_tokens`` hidden states of positions [``cond_start``, ``cond_end``) (left zero-padded;
        positions where ``attention_mask`` is 0 count as padding; ``cond_start`` > 0: a Qwen-Image template's
        system part, ``policy.qwen_image.generation_prompt``) -> the connector's (encoder_hidden_states (B,L,D),
        pooled (B,P)), or for Qwen-Image the states themselves and their mask (B,L)
        (``policy.qwen_image.text_condition``)."""
        b, t, h = hidden.shape
        end = torch.as_tensor(cond_end, device=hidden.device, dtype=torch.long).reshape(-1).expand(b)
        start = torch.as_tensor(cond_start, device=hidden.device, dtype=torch.long).reshape(-1).expand(b)
        if bool(((end <= start) | (start < 0) | (end > t)).any()):
            raise ValueError(f"condition: cond_start {start.tolist()}, cond_end {end.tolist()}: not 0 <= start < "
                             f"end <= {t}")
        n = self.cfg.cond_tokens
        idx = end[:, None] - n + torch.arange(n, device=hidden.device)[None]
        valid = idx >= start[:, None]
        idx = idx.clamp(min=0)
        if attention_mask is not None:
            valid = valid & attention_mask.bool().gather(1, idx)
        window = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, h))
        window = torch.where(valid.unsqueeze(-1), window, torch.zeros_like(window))
        if self.connector is None:
            return qwen_image.text_condition(window.to(self.bridge.pos.dtype), valid)
        return self.connector(window.to(self.bridge.pos.dtype), valid)

    def velocity(
        self,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        """Generator velocity at noise level ``sigma`` (timestep = sigma * 1000, as diffusers' SD3); ``pooled``:
        :meth:`condition`'s second output (Qwen-Image: the mask, ``policy.qwen_image.velocity``)."""
        dtype = torch_dtype(self.cfg)
        sigma = torch.as_tensor(sigma, device=latent.device, dtype=torch.float32).reshape(-1)
        if self.connector is None:
            v = qwen_image.velocity(self.generator, latent, sigma.expand(latent.shape[0]), encoder_hidden_states,
                                    pooled, dtype)
            return v.to(latent.dtype)
        timestep = (sigma * 1000.0).expand(latent.shape[0]).to(dtype)
        v = self.generator(
            hidden_states=latent.to(dtype),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=timestep,
            return_dict=False,
        )[0]
        return v.to(latent.dtype)

    # ---- VAE ----------------------------------------------------------------------------------
    def _vae_shift_scale(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        return qwen_image.latent_norm(self.vae, self.device)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [0,1] -> float32 latent ``(mean - shift) * scale`` (B,C,h,w)."""
        shift, scale = self._vae_shift_scale()
        x = pixels.to(device=self.device, dtype=torch_dtype(self.cfg)) * 2.0 - 1.0
        z = qwen_image.from_vae(self.vae, self.vae.encode(qwen_image.to_vae(self.vae, x)).latent_dist.mean)
        return ((z.float() - shift) * scale).contiguous()

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B,C,h,w) -> float32 pixels in [0,1] (gradients flow to the latent)."""
        shift, scale = self._vae_shift_scale()
        z = (latent / scale + shift).to(torch_dtype(self.cfg))
        x = qwen_image.from_vae(self.vae, self.vae.decode(qwen_image.to_vae(self.vae, z), return_dict=False)[0])
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def generated_slot(self, latents: torch.Tensor) -> torch.Tensor:
        """What the bridge reads of generated latents (B,C,h,w): the latents themselves, or with
        ``model.read_generation: pixels`` their decoded image, rounded to 8 bits and encoded again."""
        if self.cfg.read_generation == "latent":
            return latents
        pixels = (self.decode_latent(latents.to(self.device)) * 255.0).round() / 255.0
        return self.encode_image(pixels).to(latents.device)

    # ---- weights ------------------------------------------------------------------------------
    def module_groups(self) -> dict[str, list[nn.Module]]:
        """The trainable sub-modules by side (``learner.train_lm`` / ``train_generator``, ``lm_lr_scale`` /
        ``generator_lr_scale``)."""
        generation = [self.generator] + ([self.connector] if self.connector is not None else [])
        return {"understanding": [self.lm, self.bridge], "generation": generation}

    def _tower_frozen(self) -> bool:
        """A VLM's tower is frozen unless it is used (a processor) and trains (``model.train_vision_tower``)."""
        has_tower = getattr(getattr(self.lm, "model", None), "visual", None) is not None
        return has_tower and (self.vision is None or not self.cfg.train_vision_tower)

    def _frozen_prefixes(self) -> tuple[str, ...]:
        frozen = ("vae.", "generator.") if self.cfg.freeze_generator else ("vae.",)
        if self._tower_frozen():
            frozen += ("lm.model.visual.",)
        return frozen

    def trainable_state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """Name -> tensor for everything but the frozen parts (VAE; generator if frozen; with LoRA, every
        base weight: the adapters and heads only). Names are ``load_state_dict(strict=False)`` compatible;
        tensors share storage with the model."""
        if self.lora is not None:
            return self.lora.trainable_state_dict(self, keep_vars)
        skip = self._frozen_prefixes()
        return {k: v for k, v in self.state_dict(keep_vars=keep_vars).items() if not k.startswith(skip)}

    def lora_roots(self) -> dict[str, dict[str, nn.Module]]:
        """Where ``model.lora`` puts adapters (``policy.lora``): the LM side and the generator side."""
        return unified_lora_roots(self.lm, self.generator)

    def adapted_modules(self) -> dict[str, list[str]]:
        """LoRA: adapted module -> its adapter tensors' names (what every weight sync verifies); {} without."""
        return {} if self.lora is None else self.lora.modules(self)

    def weights_digest(self) -> dict[str, float]:
        """Per-tensor float64 sums of the trainable weights: a cheap check that two replicas agree."""
        return tensor_sums(self.trainable_state_dict())

    def load_trainable(
        self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], share: bool = False
    ) -> int:
        """Copy tensors in place (optimizer references stay valid); unknown names raise. Returns the count.
        ``share``: take a received tensor as the weight itself, no copy (``policy.weights.load_named_tensors``:
        a rollout replica's path)."""
        return load_named_tensors(self.trainable_state_dict(keep_vars=share), named_tensors, share)


def unified_lora_roots(lm: nn.Module, generator: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """The LoRA sides of a unified policy whose LM and generator are ``lm`` and ``generator``."""
    return {"lm": {"lm": lm}, "generator": {"generator": generator}}
