"""The configuration reference's words: a line per section and a description per field, keyed by path
(rendered with the schema by ``services.config_reference``)."""

from __future__ import annotations

# One line per section, keyed by its path ("" = the top level).
SECTION_DOCS: dict[str, str] = {
    "": "The run's identity.",
    "model": "What the policy is built from (`policy/config.py`). A null `*_path` builds that part tiny, "
             "random-init from config (no download).",
    "task": "Where prompts come from (`tasks/`): the synthetic degraded shapes VQA, or a JSONL / TSV file.",
    "model.lora": "LoRA adapters (peft, `policy/lora.py`) on the LM and the generator (Janus: its language "
                  "model and its generation aligner + head): only the adapters and the fresh heads (bridge, "
                  "connector) train, sync (each adapted module verified) and are "
                  "checkpointed; `unigrpo export` merges them into a self-contained directory.",
    "rollout": "The rollout worker pool (`rollout/`): sampling, resources, the SDE sampler, vLLM, autoscaling.",
    "rollout.sde": "The stochastic flow-matching sampler (`policy/sde.py`): a window of SDE steps with "
                   "log-probs, plain Euler elsewhere.",
    "rollout.vllm": "The vLLM text engine (`rollout.engine: vllm`, GPU).",
    "rollout.autoscale": "The pool size bounds, and the optional policy that resizes the pool from the "
                         "rollout / learn time split between steps.",
    "reward": "How trajectories are scored (`reward/`, `services/reward_backend.py`).",
    "reward.components[]": "One weighted reward function (`reward/registry.py`); the total is the weighted sum.",
    "reward.serve": "The Ray Serve reward app (`reward.backend: serve`, and `unigrpo serve reward`).",
    "reward.serve.autoscaling": "Replica bounds of the Serve reward deployment.",
    "learner": "The DeepSpeed learner ranks (`learner/`).",
    "learner.sync": "Weight sync from the learner to the rollout workers (`sync/`).",
    "algorithm": "Stage 2 (GRPO + Flow-GRPO): steps, sync / async, advantages and the policy losses.",
    "sft": "Stage 1: supervised warm start before GRPO (CLEAR's generate-then-answer; GvU's captioning).",
    "tracking": "MLflow (the driver alone logs).",
    "vae_fit": "The tiny VAE fitted to the task's clean images before stage 1 (`services/vae_fit.py`): "
               "applies when `model.vae_path` is null on `model.arch: unified` with `task.name: shapes_vqa`; "
               "cached under `<checkpoint.dir>/tiny-vae/<key>/`, then every actor loads it.",
    "evaluation": "The held-out report (`services/evaluate.py`) before and after stage 2 and in `unigrpo eval`: "
                  "per set, accuracy per generation mode, trigger rate, restoration PSNR / SSIM, paired tests.",
    "checkpoint": "Atomic checkpoints and `--resume`.",
    "cluster": "Ray: local or an existing cluster, and the resources actors ask for.",
}

# Descriptions written for the reference, keyed by field path; a field without an entry here is described by
# the comment beside it in the source (``tests/test_docs.py`` fails when a field has neither).
FIELD_DOCS: dict[str, str] = {
    "run_name": "Names the run: checkpoints go to `<checkpoint.dir>/<run_name>/`, the control actor is "
                "`unigrpo-control-<run_name>` (what `unigrpo scale --run` finds).",
    "recipe": "A registered recipe (`recipes/`: `clear`, `uae`, `gvu`): it picks the rollout, the requests "
              "built from task items, the stage-1 examples and the evaluation.",
    "seed": "Seeds the sampler, rollouts and initialisation; a run is deterministic for a seed.",
    # model
    "model.arch": "`unified`: LM + flow generator + VAE + bridge (`UnifiedPolicy`); `janus`: one "
                  "autoregressive model that generates images as VQ codes (`JanusPolicy`).",
    "model.janus_tiny": "Overrides of the tiny Janus's sub-configs, keyed `text`, `vision`, `vq` "
                        "(`policy/janus_tiny.py`); used when `janus_path` is null.",
    "model.lm_path": "A local Hugging Face causal-LM directory (`*ForCausalLM`), or a vision-language "
                     "model directory (`model_type` `qwen2_5_vl` / `qwen3_vl`, loaded with "
                     "`AutoModelForImageTextToText`, with its `preprocessor_config.json`; "
                     "`services/lm_support.py`); null builds the tiny Qwen2 LM, or takes a Qwen-Image "
                     "`generator_path`'s `text_encoder/`.",
    "model.lm_tiny": "Overrides of the tiny LM's `Qwen2Config` (`policy.config.TINY_LM`).",
    "model.tokenizer_path": "A local tokenizer directory; null takes the LM's (a Qwen-Image pipeline's "
                            "`tokenizer/`), else trains the tiny byte-level BPE in code.",
    "model.generator_class": "The diffusers transformer class of the generator.",
    "model.generator_path": "A local diffusers transformer directory, or a diffusers pipeline directory "
                            "(`model_index.json`; SD3 / SD3.5, or Qwen-Image, whose `text_encoder/` is then "
                            "the LM): its `transformer/`, `vae/` and `scheduler/` load and the scheduler's "
                            "sigmas (its `shift`) drive the sampler; null builds the tiny DiT (unshifted sigmas).",
    "model.generator_tiny": "Overrides of the tiny generator's config (`policy.config.TINY_GENERATOR`).",
    "model.vae_path": "A local diffusers VAE directory; null takes the pipeline's `vae/` when "
                      "`generator_path` is a pipeline directory, else builds the tiny VAE.",
    "model.vae_tiny": "Overrides of the tiny VAE's config (`policy.config.TINY_VAE`).",
    "model.read_generation": "CLEAR: what the LM reads of a generated image. `latent`: the latent itself "
                             "through the bridge (the Latent Representation Bridge); `pixels`: its decoded "
                             "image, rounded to 8 bits and encoded again by the VAE (the paper's decode -> "
                             "re-encode ablation).",
    "model.input_image": "How the input image reaches the LM: `vision` (a VLM `lm_path`'s own image "
                         "processor and vision tower, at its `<|image_pad|>` tokens), `bridge` (VAE latent -> "
                         "Latent Representation Bridge -> `<img>` slots), or `both` (the vision run, then the "
                         "bridge slot: CLEAR stage 1); null: `vision` for a VLM, `bridge` for a causal LM. "
                         "Generated latents always enter through the bridge.",
    "model.train_vision_tower": "Train a VLM `lm_path`'s vision tower (false: frozen, neither trained nor "
                                "synced).",
    "model.image_size": "Pixels per side of the images the policy encodes and generates (a multiple of 8).",
    "model.cond_tokens": "How many of the LM's last hidden states condition the generator (through the "
                         "connector).",
    "model.bridge_patch": "Latent patch size of the Latent Representation Bridge: one context token per "
                          "patch of a latent.",
    "model.dtype": "Parameter dtype of the policy.",
    "model.seed": "Seed of the random initialisation of tiny parts.",
    "model.freeze_generator": "Freeze the generator in both stages (it is part of the reward environment; "
                              "no LoRA adapter on it); needs `learner.train_generator: false`. UAE's LM-only "
                              "mode after a stage 1 that trains it: `learner.generator_lr_scale: 0`.",
    "model.lora.enabled": "Train LoRA adapters instead of the full LM and generator (either `model.arch`; "
                          "a vLLM engine holds the merged weights).",
    "model.lora.rank": "Adapter rank r: each adapted linear layer gets A (r x in) and B (out x r).",
    "model.lora.alpha": "Adapter scale: the update is (alpha / rank) * B A.",
    "model.lora.dropout": "Dropout on the adapters' input in the learner's training forwards (the KL "
                          "reference and the rollouts run without it).",
    "model.lora.lm_target_modules": "Module-name suffixes of the LM's linear layers that get an adapter "
                                    "(peft matching); each must match a layer; [] leaves the LM frozen; a VLM's "
                                    "vision tower only with `model.train_vision_tower`.",
    "model.lora.generator_target_modules": "Module-name suffixes of the generator's linear layers that get "
                                           "an adapter; null: the architecture's (unified: the SD3 joint-"
                                           "attention projections; janus: `fc1`, `proj_out`, `vision_head`); "
                                           "each must match a layer; [] (or `model.freeze_generator`) leaves "
                                           "the generator frozen.",
    # task
    "task.name": "`shapes_vqa` (synthetic, generated in code), `jsonl` or `tsv` (VLMEvalKit-style); the "
                 "file types need `task.path`.",
    "task.path": "The JSONL / TSV file of prompts.",
    "task.train_size": "Items in the synthetic training set.",
    "task.eval_size": "Held-out items per evaluation set (clean and each severity).",
    "task.image_size": "Pixels per side of the synthetic images.",
    "task.degradations": "Corruptions of the 16-type suite (`tasks/degrade.py`) sampled for training "
                         "images.",
    "task.severities": "Severities sampled (1-3: the suite's intensity levels 0.23, 0.45, 0.9).",
    "task.degrade_prob": "Probability that a training image is degraded.",
    "task.shuffle_choices": "Shuffle the multiple-choice options per item (the answer letter moves with "
                            "them); off keeps the tiny default learnable in minutes.",
    "task.question_types": "Question types to sample: a list (equal weights) or name -> weight. "
                           "`shapes_vqa` knows color, shape, count, position.",
    "task.on_bad_row": "A malformed row in a JSONL / TSV file: `stop` with an error naming it, or "
                       "`skip` it and count it.",
    # rollout
    "rollout.engine": "Text engine: `hf` (transformers, CPU or GPU) or `vllm` (GPU).",
    "rollout.num_workers": "Rollout workers at start (each its own actor and placement group).",
    "rollout.prompts_per_step": "Prompts per GRPO step (B).",
    "rollout.group_size": "Samples per prompt (G): the group an advantage is relative to.",
    "rollout.max_new_tokens": "Token budget of one response.",
    "rollout.temperature": "Sampling temperature.",
    "rollout.top_p": "Nucleus sampling threshold (1: off).",
    "rollout.max_images": "Images one response may generate (CLEAR's generation trigger; 0: text only).",
    "rollout.num_cpus_per_worker": "CPUs each rollout worker asks Ray for (also its torch threads).",
    "rollout.num_gpus_per_worker": "GPUs each rollout worker asks Ray for (fractions share a GPU).",
    "rollout.call_timeout_s": "Every wait on a rollout call (a chunk of prompts, a decode, a drain) ends "
                              "within this; a worker that does not answer is declared dead, killed and "
                              "replaced, and its prompts are re-queued with their seeds.",
    "rollout.start_timeout_s": "A new or restarted worker has built its model and loaded the current weights "
                               "within this, else it is declared dead and restarted (3 tries). A placement "
                               "that cannot be met waits without limit (`pool/pending`); it is no error.",
    "rollout.sde.steps": "Denoising steps per image.",
    "rollout.sde.window": "Stochastic (SDE) steps whose log-probs are recorded and trained.",
    "rollout.sde.window_position": "Where the window sits: `fixed` at `window_start`, or `random` per image.",
    "rollout.sde.window_start": "First window step when `window_position: fixed`.",
    "rollout.sde.strength": "null: the recipe's (clear 0.6 where the input image's latent is in the context: `model.input_image` bridge or both, or the tiny LM; else 1). CLEAR's restorations: 1 samples "
                            "from pure noise; s < 1 starts from the input "
                            "image's latent noised to sigma s, `(1 - s) z + s eps` (diffusers' img2img "
                            "`strength`), and runs the steps over s x the schedule's sigmas; stage 1's flow loss "
                            "trains the same path (`policy.sde.restoration_flow`). Needs the input image's latent "
                            "(`model.input_image` bridge or both).",
    "rollout.sde.noise_level": "The SDE's noise scale `a` (`policy/sde.py`: `std_t = a * sqrt(sigma / "
                               "(1 - sigma))`).",
    "rollout.vllm.gpu_memory_utilization": "Share of the GPU's memory vLLM may take.",
    "rollout.vllm.enforce_eager": "Run vLLM without CUDA graphs.",
    "rollout.autoscale.enabled": "Resize the pool between steps from the time split (a manual "
                                 "`unigrpo scale` turns it off for the rest of the run).",
    "rollout.autoscale.min_workers": "Lower bound of the pool size (`rollout.num_workers`, the autoscaler and "
                                     "`unigrpo scale`, whose request is clamped to the bounds).",
    "rollout.autoscale.max_workers": "Upper bound of the pool size (`rollout.num_workers`, the autoscaler and "
                                     "`unigrpo scale`, whose request is clamped to the bounds).",
    "rollout.autoscale.target_rollout_fraction": "Target share of rollout in rollout + learn time: a worker "
                                                 "is added above target + 0.1, removed below target - 0.1.",
    # reward
    "reward.backend": "`actor`: the run's reward actor; `serve`: the Ray Serve reward app "
                      "(`unigrpo-reward-<run_name>`, no HTTP route).",
    "reward.components": "The weighted reward functions; each is logged separately.",
    "reward.num_cpus": "CPUs the reward actor asks Ray for.",
    "reward.num_gpus": "GPUs the reward actor asks Ray for; a reward that scores with the policy (`gvu`) then "
                       "runs it on the GPU.",
    "reward.components[].name": "A built-in reward (`answer`, `format`, `clip_similarity`, `latent_quality`, "
                                "`gvu`; `reward/names.py`) or `package.module:function`.",
    "reward.components[].applies_to": "`trajectory`: in the total reward, whose group advantage every text token "
                                      "and denoising step of a trajectory takes; `denoising`: out of the total, "
                                      "its own group advantage (times the weight) is added on the denoising steps "
                                      "alone while `algorithm.lambda_img` > 0 (`services/step_batch.py`).",
    "reward.components[].weight": "Its weight in the total reward.",
    "reward.components[].kwargs": "Keyword arguments of the reward function (e.g. `clip_similarity`'s "
                                  "backbones; a backbone `{kind: clip, fit: true}` is the tiny CLIP tower "
                                  "fitted to the task's images before stage 1, `services/clip_fit.py`).",
    "reward.serve.route_prefix": "HTTP route of `unigrpo serve reward` (`POST <prefix>/score`).",
    "reward.serve.max_body_mb": "Largest request body the HTTP apps accept (larger: 413).",
    "reward.serve.autoscaling.min_replicas": "Fewest replicas.",
    "reward.serve.autoscaling.max_replicas": "Most replicas.",
    # learner
    "learner.num_workers": "Learner ranks (DeepSpeed data parallel; shards are whole groups).",
    "learner.zero_stage": "DeepSpeed ZeRO stage.",
    "learner.lr": "Stage-2 (GRPO) learning rate.",
    "learner.weight_decay": "AdamW weight decay.",
    "learner.betas": "AdamW betas.",
    "learner.grad_clip": "Gradient-norm clip (0: off).",
    "learner.mini_batches": "Optimizer steps per GRPO step: the batch cut into this many mini-batches of "
                            "whole prompt groups (at most `rollout.prompts_per_step`).",
    "learner.train_lm": "Train the understanding side (LM, bridge; Janus: its understanding encoder).",
    "learner.train_generator": "Train the generation side (generator, connector; Janus: its image-code "
                               "head).",
    "learner.gradient_checkpointing_lm": "Recompute the LM's (and a VLM tower's) layer activations in backward "
                                         "instead of keeping them (learner forward only; needs `train_lm`).",
    "learner.gradient_checkpointing_generator": "Recompute the flow generator's block activations in backward "
                                                "(learner forward only; `model.arch: unified`).",
    "learner.offload_params": "ZeRO-3 parameter offload: partitions live in host memory between uses "
                              "(`zero_stage: 3`).",
    "learner.offload_optimizer": "ZeRO optimizer offload: fp32 master weights, AdamW moments, gradient partitions "
                                 "and the step on the host (torch AdamW; `zero_stage` >= 1).",
    "learner.num_cpus_per_worker": "CPUs each learner rank asks Ray for (also its torch threads).",
    "learner.num_gpus_per_worker": "GPUs each learner rank asks Ray for.",
    "learner.call_timeout_s": "The longest the driver waits on a learner call (a step, a save, a publish).",
    "learner.sync.backend": "`object_store` (any topology), or `nccl`: a collective group the driver "
                            "builds over learner rank 0, the rollout workers and a GvU reward actor "
                            "(`sync/group.py`; NCCL on GPUs, gloo on CPU; sync and async mode: each "
                            "version is staged on rank 0 when published and broadcast beside training).",
    "learner.sync.bucket_mb": "Weights travel in buckets of about this size.",
    "learner.sync.timeout_s": "A weight sync that takes longer fails (it never hangs).",
    # algorithm
    "algorithm.steps": "GRPO steps (stage 2).",
    "algorithm.mode": "`sync`, or `async`: up to `max_staleness` batches are generated and scored ahead "
                      "of the learner (`services/pipeline.py`).",
    "algorithm.max_staleness": "Async: batches in flight ahead of the learner (>= 1), and the oldest policy "
                               "version (behind the learner's) a trajectory may come from; older ones are "
                               "dropped and counted.",
    "algorithm.adv_scale": "`std`: `(r - mean) / (std + eps)`; `none`: `r - mean` (Dr. GRPO).",
    "algorithm.zero_variance": "Groups whose rewards are all equal: `drop` them, or train them at "
                               "advantage `zero`.",
    "algorithm.clip_low": "Text ratio clip below 1 (`1 - clip_low`).",
    "algorithm.clip_high": "Text ratio clip above 1 (`1 + clip_high`).",
    "algorithm.kl": "KL estimator of the text loss (`learner/losses.py`).",
    "algorithm.beta_text": "KL weight of the text loss (0: no reference model).",
    "algorithm.agg": "How token losses are aggregated over the batch.",
    "algorithm.clip_img": "Image (Flow-GRPO) ratio clip: `[1 - clip_img, 1 + clip_img]`.",
    "algorithm.beta_img": "KL weight of the image loss.",
    "algorithm.eval_every": "Held-out evaluation every k GRPO steps (0: only before and after stage 2).",
    "algorithm.lambda_img": "Weight of the image loss in `L_text + lambda_img * L_img`.",
    # sft
    "sft.enabled": "Run stage 1 before GRPO.",
    "sft.steps": "Stage-1 optimizer steps.",
    "sft.batch_size": "Examples per stage-1 step.",
    "sft.lr": "Stage-1 learning rate.",
    "sft.flow_weight": "Weight of the flow-matching loss.",
    "sft.text_weight": "Weight of the text cross-entropy.",
    # vae_fit
    "vae_fit.enabled": "Fit the tiny VAE before stage 1 (false: the random-init VAE; latents then decode "
                       "to noise).",
    "vae_fit.images": "Clean training images it is fitted on (at most `task.train_size`).",
    "vae_fit.eval_images": "Held-out clean images (at most `task.eval_size`) whose reconstruction PSNR / SSIM "
                           "is printed and logged (`vae_fit/psnr_db`, `vae_fit/ssim`).",
    "vae_fit.epochs": "Passes over the images (steps = epochs x images / batch_size).",
    "vae_fit.batch_size": "Images per fit step.",
    "vae_fit.lr": "Peak Adam learning rate (one-cycle schedule).",
    "vae_fit.kl_weight": "Weight of the KL term beside the reconstruction MSE.",
    # evaluation
    "evaluation.severities": "Degraded held-out sets beside clean, `task.eval_size` images each; the evals "
                             "every `algorithm.eval_every` steps use the highest one.",
    "evaluation.modes": "`greedy` / `sampled`: as the model chooses (temperature 0 / `rollout.temperature`); "
                        "`forced`: every response opens with `<gen>` (and restoration is measured); "
                        "`forbidden`: `<gen>` is never sampled.",
    "evaluation.every_modes": "Modes of the evals every `algorithm.eval_every` steps, on clean and the highest "
                              "severity (`forced` adds restoration PSNR / SSIM to the curve).",
    "evaluation.bootstrap_samples": "Paired-bootstrap resamples of the stage-1 vs stage-2 comparison (seeded by "
                                    "`seed`; the exact McNemar test needs none).",
    # tracking / checkpoint / cluster
    "tracking.uri": "MLflow tracking URI; null: `$MLFLOW_TRACKING_URI`, else `sqlite:///./mlflow.db`.",
    "tracking.experiment": "MLflow experiment name.",
    "tracking.log_images_every": "Log sample images every k GRPO steps (0: never).",
    "checkpoint.dir": "Root directory of checkpoints (on a cluster: storage every node sees).",
    "checkpoint.every": "Checkpoint every k GRPO steps (0: off).",
    "checkpoint.keep": "Checkpoints kept (older ones are deleted).",
    "cluster.address": "Ray address; null: `$RAY_ADDRESS`, else start a local Ray.",
    "cluster.num_cpus": "CPUs of a local Ray (null: the machine's, or what the actors need if more).",
    "cluster.rollout_resource": "Custom resource each rollout worker asks for "
                                "(`use_custom_resources: true`; see deploy/README.md).",
    "cluster.learner_resource": "Custom resource each learner rank asks for.",
    "cluster.use_custom_resources": "Ask for the two custom resources above (KubeRay node groups).",
}
