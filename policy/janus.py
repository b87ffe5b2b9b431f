"""JanusPolicy: an adapter for transformers' ``JanusForConditionalGeneration`` (UMM-2 style: ONE
autoregressive model both understands and generates; images are generated as discrete VQ codes).

Joint token space. Text ids are ``[0, V_text)``; VQ code ``c`` of an image is the id ``V_text + c``
(``image_offset = V_text``). A sequence such as

    "\\n" prompt "\\n" <img_start> (V_text + c_1) ... (V_text + c_n)

goes through one LM; the embedding of a position is

    e_t = E_text[x_t]                                     x_t < V_text   (text)
    e_t = aligner(E_gen[x_t - V_text])                    x_t >= V_text  (image code, Janus's generation path)

and the next-token distribution comes from the head of the NEXT token's kind:

    log p(x_t | x_<t) = log_softmax(lm_head(h_{t-1}) / T)[x_t]                          text
                      = log_softmax(generation_head(h_{t-1}) / T)[x_t - V_text]         image code

so ``token_logprobs`` gives one (B, T) log-prob tensor over text AND image tokens, and the text GRPO loss
(``learner.losses.text_policy_loss`` with ``loss_mask`` True on the sampled codes) trains image generation.
Understanding inputs (pixels through the SigLIP encoder + aligner at ``image_token_id`` placeholders) are
supported by ``pixel_values`` (``understanding_pixels`` makes them from [0,1] pixels). Sampling draws from
the unguided distribution (no classifier-free guidance), so behaviour and recomputed log-probs describe the
same policy.

Special tokens: ``token_ids["img"]`` is the model's ``image_token_id`` (understanding placeholder); with a
real Janus tokenizer ``img_start`` / ``img_end`` are its ``boi_token`` / ``eoi_token`` (``<begin_of_image>``,
``<end_of_image>``), so prompts follow Janus's own image layout. Prompts are Janus-Pro conversations
(``policy.janus_chat``): the checkpoint's chat template, else Janus-Pro's format written in code.

The VQ model is frozen (Janus keeps it in eval); everything else is trainable. With ``model.lora``
(``policy.lora``) only adapters train: on the language model's projections (the LM side) and on the generation
aligner and head (the generator side); the vision encoder, its aligner, the embeddings and the text head stay
the base's. ``from_config`` builds one from the run's ``model`` section (``arch: janus``; see
``policy.factory.build_policy``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from policy.bridge import positions_from_mask
from policy.build import build_tokenizer, torch_dtype
from policy.config import PolicyConfig
from policy.janus_chat import DEFAULT_IMAGE_TOKEN, JANUS_PRO_SYSTEM_PROMPT, chat_ids, chat_template_of
from policy.janus_persist import read_adapters, read_janus_dir, write_adapters, write_janus_dir
from policy.janus_tiny import TINY_TEXT, TINY_VISION, TINY_VQ, tiny_janus_config
from policy.lora import Adapters
from policy.tokenizer import build_tiny_tokenizer, special_token_ids
from policy.vision import cache_keyword
from policy.weights import load_named_tensors, tensor_sums


class JanusPolicy(nn.Module):
    """Janus with a joint text + image-code token space (see the module docstring)."""

    arch = "janus"  # PolicyConfig.arch

    def __init__(self, model: nn.Module, tokenizer: Any, image_mean: Iterable[float] = (0.5, 0.5, 0.5),
                 image_std: Iterable[float] = (0.5, 0.5, 0.5), cfg: PolicyConfig | None = None,
                 chat_template: str | None = None) -> None:
        super().__init__()
        self.model = model  # JanusForConditionalGeneration
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.token_ids: dict[str, int] = special_token_ids(tokenizer)
        self.token_ids["img"] = int(model.config.image_token_id)
        for key, attr in (("img_start", "boi_token"), ("img_end", "eoi_token")):
            text = getattr(tokenizer, attr, None)
            if text:
                self.token_ids[key] = int(tokenizer.convert_tokens_to_ids(text))
        self.image_offset = int(model.config.text_config.vocab_size)
        self.image_mean, self.image_std = [float(x) for x in image_mean], [float(x) for x in image_std]
        self.chat_template = chat_template or chat_template_of(tokenizer)
        self.model.model.vqmodel.requires_grad_(False)
        self.lora: Adapters | None = None  # model.lora: set by from_config
        self.eval()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: PolicyConfig) -> JanusPolicy:
        """``janus_path`` (a local checkpoint), else a tiny random-init Janus (``janus_tiny`` overrides,
        seeded by ``cfg.seed``: every replica built from the same config is identical)."""
        cfg.check_paths()
        dtype = torch_dtype(cfg)
        if cfg.janus_path:
            policy = cls.from_pretrained(cfg.janus_path, cfg.tokenizer_path, dtype)
        else:
            t = cfg.janus_tiny
            policy = cls.from_tiny(cfg.seed, t.get("text"), t.get("vision"), t.get("vq"), build_tokenizer(cfg))
            policy.model.to(dtype)
        policy.cfg = cfg
        if cfg.lora.enabled:
            policy.lora = Adapters.attach(policy)
        return policy

    @classmethod
    def from_tiny(cls, seed: int = 0, text: dict | None = None, vision: dict | None = None,
                  vq: dict | None = None, tokenizer: Any = None) -> JanusPolicy:
        """Random-init tiny Janus with the project's tiny BPE tokenizer (no download)."""
        from transformers import JanusForConditionalGeneration

        tok = tokenizer if tokenizer is not None else build_tiny_tokenizer()
        ids = special_token_ids(tok)
        cfg = tiny_janus_config(len(tok), ids["img"], text, vision, vq)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = JanusForConditionalGeneration(cfg)
        return cls(model, tok)

    @classmethod
    def from_pretrained(cls, path: str, tokenizer_path: str | None = None, dtype: torch.dtype = torch.float32
                        ) -> JanusPolicy:
        """A local Janus checkpoint (``policy.janus_persist.read_janus_dir``)."""
        return cls(**read_janus_dir(path, tokenizer_path, dtype))

    @classmethod
    def from_adapters(cls, directory: str | Path) -> JanusPolicy:
        """What :meth:`save_pretrained` writes for a LoRA policy: the base its ``model`` section names, then
        the saved adapters (every one, or ValueError)."""
        d = Path(directory)
        cfg, adapters = read_adapters(d)
        policy = cls.from_config(cfg)
        own = policy.trainable_state_dict()
        if policy.load_trainable(adapters) != len(own):
            raise ValueError(f"{d}: does not hold every adapter of {len(own)} tensors")
        return policy

    def save_pretrained(self, directory: str | Path) -> None:
        """A plain Hugging Face Janus directory that :meth:`from_pretrained` (and ``model.janus_path``) loads
        back; with LoRA, the adapters and the ``model`` section naming the base (:meth:`from_adapters`;
        ``policy.lora.merged`` for a plain directory)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (write_adapters if self.lora is not None else write_janus_dir)(self, d)

    def train(self, mode: bool = True) -> JanusPolicy:
        super().train(mode)
        self.model.model.vqmodel.eval()  # frozen, always eval
        return self

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def lm_config(self) -> Any:
        """The language model's transformers config."""
        return self.model.model.language_model.config

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The text head on hidden states (..., H) -> text-vocabulary logits (..., V_text)."""
        return self.model.lm_head(hidden)

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.vq_config.num_embeddings)

    @property
    def n_image_tokens(self) -> int:
        """Codes of one generated image: num_patches^2 (what the VQ decoder takes)."""
        d = self.model.model.vqmodel.quantize.quant_state_dims
        return int(d[0] * d[1])

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes -> joint token ids (``codes + image_offset``)."""
        return codes + self.image_offset

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Joint token ids of image tokens -> VQ codes."""
        return ids - self.image_offset

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.image_offset

    @property
    def n_understanding_tokens(self) -> int:
        """Features of one understood image (placeholders per image): (image_size / patch_size)^2."""
        v = self.model.config.vision_config
        return int(v.image_size // v.patch_size) ** 2

    def understanding_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [0,1] -> ``pixel_values`` of the understanding encoder: resized (bilinear) to
        its ``image_size``, then ``x' = (x - mean) / std`` per channel (the image processor's numbers)."""
        size = int(self.model.config.vision_config.image_size)
        x = pixels.float().to(self.device)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        mean, std = (x.new_tensor(v).view(1, -1, 1, 1) for v in (self.image_mean, self.image_std))
        return (x - mean) / std

    def _chat(self, text: str, image_slot: list[int] | None = None, system: str | None = None) -> list[int]:
        image_token = getattr(self.tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        return chat_ids(self.tokenizer, self.chat_template, text, image_slot=image_slot, image_token=image_token,
                        system=system)

    def generation_prompt(self, text: str) -> list[int]:
        """Prompt ids of text -> image, Janus-Pro's generation conversation:
        "<|User|>: " text "\\n\\n<|Assistant|>:" <img_start> (its begin-of-image; no system prompt)."""
        return self._chat(text) + [self.token_ids["img_start"]]

    def understanding_prompt(self, text: str, system: str | None = JANUS_PRO_SYSTEM_PROMPT) -> list[int]:
        """Prompt ids of image + question -> answer, Janus-Pro's understanding conversation: system "\\n\\n"
        "<|User|>: " <img_start> <img>*n <img_end> "\\n" text "\\n\\n<|Assistant|>:"; the answer follows
        with a leading space. ``pixel_values`` fill the ``n_understanding_tokens`` placeholders."""
        t = self.token_ids
        slot = [t["img_start"], *[t["img"]] * self.n_understanding_tokens, t["img_end"]]
        return self._chat(text, image_slot=slot, system=system)

    # ---- LM -------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """e_t = E_text[x_t] for text, aligner(E_gen[x_t - V_text]) for image codes; understanding
        features at ``image_token_id`` placeholders when ``pixel_values`` (B_img,3,H,W) are given."""
        m = self.model
        is_img = self.is_image(input_ids)
        emb = m.get_input_embeddings()(torch.where(is_img, torch.zeros_like(input_ids), input_ids))
        if bool(is_img.any()):
            codes = self.codes(input_ids[is_img])
            gen = m.prepare_embeddings_for_image_generation(codes).to(emb.dtype)  # aligner(E_gen[c])
            emb = emb.masked_scatter(is_img.unsqueeze(-1), gen)
        if pixel_values is not None:
            feats = m.model.get_image_features(pixel_values.to(emb.dtype)).pooler_output
            slots = input_ids == m.config.image_token_id
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"embed: {int(slots.sum())} image placeholders for {feats.shape[0]} image(s) "
                                 f"x {feats.shape[1]} features")
            emb = emb.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, emb.shape[-1]).to(emb.dtype))
        return emb

    def _lm(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None):
        positions = positions_from_mask(attention_mask)[:, -inputs_embeds.shape[1]:]
        lm = self.model.model.language_model
        out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions,
                 use_cache=past_key_values is not None, **{cache_keyword(lm): past_key_values})
        return out.last_hidden_state, out.past_key_values

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       pixel_values: torch.Tensor | None = None, temperature: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logp[:, t] = log p(x_t | x_<t)`` (float32) from the head of x_t's kind; 0 at t = 0, on padding
        and on a row's first real token. Returns (logp (B,T), hidden (B,T,H))."""
        logp, _, hidden = self._token_stats(input_ids, attention_mask, pixel_values, temperature, False)
        return logp, hidden

    def token_stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: torch.Tensor | None = None, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp, entropy, hidden): ``logp`` as :meth:`token_logprobs`; ``entropy[:, t]`` (detached) is
        H = -sum_k p_k log p_k of the temperature-scaled distribution x_t was drawn from (text vocabulary or
        codebook), 0 where ``logp`` is 0. What the learner trains on (``learner.objective.policy_outputs``)."""
        return self._token_stats(input_ids, attention_mask, pixel_values, temperature, True)

    def _token_stats(self, input_ids, attention_mask, pixel_values, temperature: float, entropy: bool):
        hidden, _ = self._lm(self.embed(input_ids, pixel_values), attention_mask)
        h, target = hidden[:, :-1], input_ids[:, 1:]
        img = self.is_image(target)
        lp = torch.zeros(target.shape, dtype=torch.float32, device=hidden.device)
        ent = torch.zeros_like(lp)
        # text: log_softmax(lm_head(h_{t-1}) / T)[x_t]; image: log_softmax(generation_head(h_{t-1}) / T)[x_t - V_text]
        for rows, head, tgt in ((~img, self.model.lm_head, target),
                                (img, self.model.model.generation_head, self.codes(target))):
            if bool(rows.any()):
                logp_all = torch.log_softmax(head(h[rows]).float() / temperature, dim=-1)
                lp = lp.masked_scatter(rows, logp_all.gather(-1, tgt[rows, None]).squeeze(-1))
                if entropy:
                    ent = ent.masked_scatter(rows, -(logp_all.exp() * logp_all.clamp(min=-1e4)).sum(-1).detach())
        m = attention_mask.bool()
        real = m[:, 1:] & m[:, :-1]
        lp, ent = torch.where(real, lp, torch.zeros_like(lp)), torch.where(real, ent, torch.zeros_like(ent))
        return F.pad(lp, (1, 0)), F.pad(ent, (1, 0)), hidden

    # ---- image generation -----------------------------------------------------------------------
    @torch.no_grad()
    def sample_image_tokens(self, prompt_ids: torch.Tensor | list[list[int]], n_tokens: int | None = None,
                            generator: torch.Generator | None = None, temperature: float = 1.0,
                            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``n_tokens`` (default :attr:`n_image_tokens`) VQ codes after each prompt, with a KV cache:

            c_k ~ softmax(generation_head(h_k) / T),   next input = aligner(E_gen[c_k])

        ``prompt_ids``: (B,P) (padding given by ``attention_mask``) or a list of rows (left-padded here).
        Returns (codes (B,n) long, behaviour log-probs (B,n) float32 under the temperature-scaled policy).
        ``temperature <= 0`` is greedy (evaluation): argmax, log-probs under the untempered distribution.
        """
        n = self.n_image_tokens if n_tokens is None else int(n_tokens)
        ids, attn = self._left_padded(prompt_ids, attention_mask)
        ids, attn = ids.to(self.device), attn.to(self.device)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config.text_config)
        hidden, cache = self._lm(self.embed(ids), attn, past_key_values=cache)
        b = ids.shape[0]
        codes = torch.zeros((b, n), dtype=torch.long)
        logps = torch.zeros((b, n), dtype=torch.float32)
        head = self.model.model.generation_head
        for k in range(n):
            logits = head(hidden[:, -1]).float()
            if temperature <= 0:
                logp_all = torch.log_softmax(logits, dim=-1)
                c = logp_all.argmax(-1).cpu()
            else:
                logp_all = torch.log_softmax(logits / temperature, dim=-1)
                c = torch.multinomial(logp_all.exp().cpu(), 1, generator=generator).squeeze(-1)
            codes[:, k] = c
            logps[:, k] = logp_all.cpu().gather(-1, c[:, None]).squeeze(-1)
            if k == n - 1:
                break
            attn = torch.cat([attn, attn.new_ones(b, 1)], dim=1)
            step = self.model.prepare_embeddings_for_image_generation(c[:, None].to(self.device))
            hidden, cache = self._lm(step, attn, past_key_values=cache)
        return codes, logps

    def _left_padded(self, prompt_ids: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_tensor(prompt_ids):
            mask = torch.ones_like(prompt_ids) if attention_mask is None else attention_mask
            return prompt_ids.long(), mask.long()
        pad, width = self.token_ids["pad"], max(len(r) for r in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(prompt_ids):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids, mask

    def decode_image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (B, n_image_tokens) -> float32 pixels (B,3,H,W) in [0,1] through the frozen VQ decoder
        (Janus's pixels are in [-1, 1]: x01 = (x + 1) / 2, clamped)."""
        px = self.model.model.vqmodel.decode(codes.to(self.device).long())
        return ((px.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---- weights ----------------------------------------------------------------------------------
    def module_groups(self) -> dict[str, list[nn.Module]]:
        """The trainable sub-modules by side. The LM is shared by both paths; it counts as understanding
        (``learner.train_lm`` / ``lm_lr_scale``), generation is the code embedding, its aligner and head
        (``learner.train_generator`` / ``generator_lr_scale``)."""
        m = self.model.model
        return {"understanding": [m.language_model, self.model.lm_head, m.vision_model, m.aligner],
                "generation": [m.generation_embeddings, m.generation_aligner, m.generation_head]}

    def weights_digest(self) -> dict[str, float]:
        """Per-tensor float64 sums of the trainable weights: a cheap check that two replicas agree."""
        return tensor_sums(self.trainable_state_dict())

    def lora_roots(self) -> dict[str, dict[str, nn.Module]]:
        """Where ``model.lora`` puts adapters (``policy.lora``): the language model; the generation path."""
        return lora_roots(self.model, "model")

    def trainable_state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """Everything but the frozen VQ model (what weight sync ships; with LoRA, the adapters only); tied
        weights appear once."""
        if self.lora is not None:
            return self.lora.trainable_state_dict(self, keep_vars)
        skip = "model.model.vqmodel."
        return {k: v for k, v in self.state_dict(keep_vars=keep_vars).items() if not k.startswith(skip)}

    def load_trainable(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       share: bool = False) -> int:
        """Copy tensors in place (``share``: take them as the weights, no copy); unknown names or shape
        mismatches raise. Returns the count."""
        return load_named_tensors(self.trainable_state_dict(keep_vars=share), named_tensors, share)

    def adapted_modules(self) -> dict[str, list[str]]:
        """LoRA: adapted module -> its adapter tensors' names (what every weight sync verifies); {} without."""
        return {} if self.lora is None else self.lora.modules(self)


def lora_roots(model: nn.Module, prefix: str) -> dict[str, dict[str, nn.Module]]:
    """The LoRA sides of a ``JanusForConditionalGeneration`` named ``prefix``: the LM side is its language
    model, the generator side its generation aligner and head (image codes are embedded and predicted there)."""
    m = model.model
    return {"lm": {f"{prefix}.model.language_model": m.language_model},
            "generator": {f"{prefix}.model.generation_aligner": m.generation_aligner,
                          f"{prefix}.model.generation_head": m.generation_head}}


def text_image_sequence(policy: JanusPolicy, prompt: list[int], codes: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One trajectory's (input_ids (T,), loss_mask (T,)): prompt (not trained) + image tokens (trained)."""
    ids = torch.tensor(prompt + policy.image_ids(codes.cpu()).tolist(), dtype=torch.long)
    mask = torch.tensor([False] * len(prompt) + [True] * int(codes.numel()))
    return ids, mask


__all__ = ["TINY_TEXT", "TINY_VISION", "TINY_VQ", "JanusPolicy", "text_image_sequence", "tiny_janus_config"]
