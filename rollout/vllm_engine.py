"""vLLM text engine (GPU, the ``vllm`` extra): the same ``TextEngine`` protocol as ``HFTextEngine``.

How the pieces of the unified model reach vLLM:

- **Prompts** go in as embeddings (``LLM(..., enable_prompt_embeds=True)``, prompts
  ``{"prompt_embeds": (T, H) tensor}``, vLLM's ``EmbedsPrompt``) built with ``policy.embed(ids, latents)``,
  so the bridged latents at the ``<img>`` slots reach the LM exactly as in the HF engine. Sampled
  tokens are embedded by vLLM's own ``embed_tokens`` (the same weights: they are synced with the LM's).
- **Structural tokens** (``policy.prompting.unsampleable_ids``: image slot and pad) are excluded with
  ``SamplingParams(allowed_token_ids=...)``, which vLLM applies to the logits before temperature and
  sampling. Log-prob caveat: vLLM's default ``logprobs_mode="raw_logprobs"`` reports log-probs of the
  *raw* logits (no mask, no temperature), which is not what the learner recomputes. The engine asks for
  ``logprobs_mode="processed_logprobs"`` (after the whitelist and temperature): with ``top_p == 1`` that
  is exactly the HF engine's quantity. With ``top_p < 1`` vLLM's processed log-probs are under the
  nucleus-truncated distribution, while the contract is "untruncated, temperature-scaled", so the engine
  then recomputes the behaviour log-probs with one teacher-forced pass of the policy's LM (``logprobs=
  "recompute"`` forces that always, e.g. for a vLLM without ``logprobs_mode``).
- **Weights**: the policy's LM is written with ``policy.lm.save_pretrained`` (+ tokenizer) to a temporary
  directory that vLLM loads (LoRA: the base with the adapters merged, plain names: ``policy.lora.plain_state_dict``).
  ``load_weights`` copies every received tensor into the policy (bridge / connector / embeddings are used here
  to build the prompt embeddings), then hands vLLM's worker process the LM tensors as the policy now holds them
  on the GPU, under the HF checkpoint names vLLM's model classes expect (``lm.model.layers.0...`` ->
  ``model.layers.0...``); with LoRA, the merged weight of every adapted layer (``W + (alpha / rank) B A``). The
  tensors go as CUDA IPC handles (``torch.multiprocessing.reductions.reduce_tensor``) through
  ``LLM.collective_rpc`` on a worker extension (``worker_extension_cls``, vLLM's documented RLHF hook): the
  RPC carries a few hundred bytes per tensor, the vLLM process maps the same device memory and calls
  ``model.load_weights``, whose loader handles fused (qkv / gate-up) parameters itself. No tensor data is
  pickled. The rollout worker's actor and its vLLM process share one GPU, where NCCL cannot put two ranks, so
  the actor is the member of the driver's collective group and the hop to vLLM is this device-local mapping.

- **Vision-language models** (``policy.vision``): the VLM directory vLLM loads also holds the image
  processor's ``preprocessor_config.json``. A prompt whose input image the VLM's tower reads and that holds no
  bridged latent goes in as vLLM's multimodal input, ``{"prompt_token_ids": ids, "multi_modal_data": {"image":
  [PIL images]}}``, each ``<|image_pad|>`` run collapsed to one token that vLLM's processor expands again
  (:func:`vllm_vision_prompt`). vLLM takes either multimodal data or prompt embeddings in one prompt, so a
  prompt with both (CLEAR's answer after a generated image, ``model.input_image: both``) is sampled by the
  policy's own ``HFTextEngine``.

vLLM is imported inside the class, so this module imports on a CPU machine without it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from typing import Any, Literal

import torch

from policy.lora import merged_weights, plain_state_dict
from policy.prompting import mask_unsampleable, unsampleable_ids
from rollout.engine import SamplingSettings, TextCompletion, TextRequest

INSTALL_HINT = (
    "rollout.engine 'vllm' needs vLLM, which is not installed: install the `vllm` extra "
    "(pip install 'unigrpo[vllm]') on a CUDA machine, or use rollout.engine=hf"
)
LM_PREFIX = "lm."


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError telling the user to install the ``vllm`` extra."""
    try:
        import vllm
    except ImportError as e:  # ModuleNotFoundError, or a broken install (CUDA libraries missing...)
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


def vllm_vision_prompt(input_ids: list[int], vision_images: torch.Tensor, image_pad: int) -> dict[str, Any]:
    """vLLM's multimodal prompt of a VLM request: token ids with each run of ``image_pad`` collapsed to one (vLLM's
    processor expands it to the image's patch count), the images (uint8 (m, H, W, 3)) as PIL images."""
    from PIL import Image

    ids = [t for i, t in enumerate(input_ids) if t != image_pad or i == 0 or input_ids[i - 1] != image_pad]
    images = [Image.fromarray(x) for x in vision_images.cpu().numpy()]
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}


def vllm_weight_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The ``lm.*`` tensors renamed to the LM's own (HF checkpoint) names; other tensors are dropped."""
    return [(name[len(LM_PREFIX):], t) for name, t in named_tensors if name.startswith(LM_PREFIX)]


def ipc_handles(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple]]:
    """(name, CUDA IPC handle) per tensor: ``reduce_tensor``'s (rebuild function, arguments), which another
    process on the same GPU turns back into a tensor on the same memory. The tensors must stay alive until the
    receiver has loaded them (the caller holds them across the blocking RPC)."""
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.synchronize()  # the producer's writes are done before another process reads the memory
    return [(name, reduce_tensor(t.detach())) for name, t in named_tensors]


class UnigrpoWorkerExtension:
    """Mixed into vLLM's GPU worker (``LLM(worker_extension_cls="rollout.vllm_engine.UnigrpoWorkerExtension")``);
    methods are called with ``llm.collective_rpc(name, args=...)`` and run in every worker process."""

    def unigrpo_load_ipc(self, handles: list[tuple[str, tuple]]) -> int:
        """Load the tensors of :func:`ipc_handles` (mapped, not copied, until ``load_weights`` copies them in)."""
        model = self.model_runner.model  # type: ignore[attr-defined]
        device = torch.cuda.current_device()
        weights = []
        for name, (rebuild, args) in handles:
            args = list(args)
            args[6] = device  # the handle's device index, as this process numbers the same GPU
            weights.append((name, rebuild(*args)))
        loaded = model.load_weights(weights=weights)
        torch.cuda.synchronize()
        return len(loaded) if loaded is not None else len(weights)


class VLLMTextEngine:
    """Batched sampling with vLLM on the policy's LM; behaviour log-probs as ``HFTextEngine``'s."""

    def __init__(
        self,
        policy,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        logprobs: Literal["auto", "vllm", "recompute"] = "auto",
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.engine 'vllm' needs a CUDA GPU; use rollout.engine=hf on CPU")
        if logprobs not in ("auto", "vllm", "recompute"):
            raise ValueError(f"VLLMTextEngine: logprobs must be auto | vllm | recompute, got {logprobs!r}")
        self.policy = policy
        self.logprobs = logprobs
        self._dir = tempfile.mkdtemp(prefix="unigrpo-vllm-")
        lora = getattr(policy, "lora", None) is not None
        policy.lm.save_pretrained(self._dir, safe_serialization=True,
                                  state_dict=plain_state_dict(policy.lm) if lora else None)
        policy.tokenizer.save_pretrained(self._dir)
        if getattr(policy, "vision", None) is not None:  # what vLLM needs to load the VL model's processor
            policy.vision.processor.save_pretrained(self._dir)
        self._hf = None  # the policy's own engine, for prompts vLLM cannot take (module docstring)
        lm_cfg = policy.lm_config
        self.vocab_size = int(lm_cfg.vocab_size)
        banned = set(unsampleable_ids(policy.token_ids))
        self.allowed_ids = [i for i in range(self.vocab_size) if i not in banned]
        kwargs: dict[str, Any] = {
            "model": self._dir,
            "tokenizer": self._dir,
            "enable_prompt_embeds": True,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "dtype": policy.cfg.dtype,
            "max_model_len": max_model_len or int(getattr(lm_cfg, "max_position_embeddings", 2048)),
            "seed": int(policy.cfg.seed),
            "worker_extension_cls": f"{__name__}.UnigrpoWorkerExtension",
            "logprobs_mode": "processed_logprobs",
        }
        if logprobs == "recompute":
            kwargs.pop("logprobs_mode")
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self._SamplingParams = vllm.SamplingParams

    # ---- weights ------------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        p, items = self.policy, list(named_tensors)
        p.load_trainable(items)  # bridge / connector / embeddings build the prompt embeddings here
        if getattr(p, "lora", None) is not None:  # vLLM holds merged weights: the adapted layers change
            lm = list(merged_weights(p.lm).items())
        else:  # the policy's GPU copies of the LM tensors that arrived
            own = p.trainable_state_dict()
            lm = vllm_weight_names((n, own[n]) for n, _ in items)
        if lm:
            self.llm.collective_rpc("unigrpo_load_ipc", args=(ipc_handles(lm),))
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    # ---- sampling -----------------------------------------------------------------------------------
    def _params(self, r: TextRequest, s: SamplingSettings, seed: int, with_logprobs: bool):
        return self._SamplingParams(
            n=1,
            temperature=max(float(s.temperature), 0.0),
            top_p=float(s.top_p),
            max_tokens=int(r.max_new_tokens),
            stop_token_ids=list(s.stop_ids),
            ignore_eos=True,  # stop exactly at s.stop_ids, as the HF engine does
            allowed_token_ids=([i for i in self.allowed_ids if i not in s.banned_ids] if s.banned_ids
                               else self.allowed_ids),
            logprobs=0 if with_logprobs else None,  # 0: only the sampled token's log-prob
            seed=seed,
            detokenize=False,
            skip_special_tokens=False,
        )

    def _recompute(self) -> bool:
        return self.logprobs == "recompute"

    @torch.no_grad()
    def generate(
        self, requests: list[TextRequest], s: SamplingSettings, generator: torch.Generator | None = None
    ) -> list[TextCompletion]:
        out = [TextCompletion() for _ in requests]
        mixed = [i for i, r in enumerate(requests)
                 if r.max_new_tokens > 0 and r.vision_images.shape[0] and r.slot_latents.shape[0]]
        if mixed:  # vision images and bridged latents in one prompt: the policy's own engine samples them
            if self._hf is None:
                from rollout.engine import HFTextEngine

                self._hf = HFTextEngine(self.policy)
            for i, c in zip(mixed, self._hf.generate([requests[i] for i in mixed], s, generator)):
                out[i] = c
        live = [i for i, r in enumerate(requests) if r.max_new_tokens > 0 and i not in set(mixed)]
        if not live:
            return out
        recompute = self._recompute() or (self.logprobs == "auto" and s.top_p < 1.0 and s.temperature > 0)
        gen_device = generator.device if generator is not None else "cpu"
        seeds = torch.randint(0, 2**31 - 1, (len(live),), generator=generator, device=gen_device).tolist()
        p = self.policy
        prompts, params = [], []
        for i, seed in zip(live, seeds):
            r = requests[i]
            if r.vision_images.shape[0]:  # a VLM's input image, no bridged latent: vLLM's multimodal input
                prompts.append(vllm_vision_prompt(list(r.input_ids), r.vision_images, p.token_ids["vision_pad"]))
            else:
                ids = torch.tensor([r.input_ids], dtype=torch.long, device=p.device)
                emb = p.embed(ids, r.slot_latents.to(p.device))[0]
                prompts.append({"prompt_embeds": emb.detach().cpu()})
            params.append(self._params(r, s, int(seed), with_logprobs=not recompute))
        results = self.llm.generate(prompts, params, use_tqdm=False)
        stops = set(s.stop_ids)
        for i, res in zip(live, results):
            o = res.outputs[0]
            c = out[i]
            c.token_ids = [int(t) for t in o.token_ids]
            c.finish = "stop" if c.token_ids and c.token_ids[-1] in stops else "length"
            if not recompute:
                c.logprobs = [float(step[t].logprob) for t, step in zip(c.token_ids, o.logprobs)]
        if recompute:
            for i in live:
                out[i].logprobs = self.policy_logprobs(requests[i], out[i].token_ids, s.temperature)
        return out

    @torch.no_grad()
    def policy_logprobs(self, r: TextRequest, completion: list[int], temperature: float) -> list[float]:
        """Log-probs of ``completion`` after ``r``'s prompt under the policy's LM, with the unsampleable
        tokens masked and the logits divided by ``temperature`` (untempered when it is 0)."""
        if not completion:
            return []
        p = self.policy
        ids = torch.tensor([list(r.input_ids) + list(completion)], dtype=torch.long, device=p.device)
        attn = torch.ones_like(ids)
        logits, _ = p.lm_forward(ids, attn, r.slot_latents.to(p.device), images=r.vision_images)
        n = len(completion)
        lg = mask_unsampleable(logits[0, -n - 1 : -1].float(), p.token_ids)
        if temperature > 0:
            lg = lg / temperature
        lp = torch.log_softmax(lg, dim=-1).gather(-1, ids[0, -n:, None]).squeeze(-1)
        return [float(x) for x in lp.cpu()]

    def close(self) -> None:
        """Free the engine and its temporary model directory."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:  # best effort
        d = getattr(self, "_dir", None)
        if d:
            shutil.rmtree(d, ignore_errors=True)
