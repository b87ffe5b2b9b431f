"""The driver loop: prompts -> rollout pool -> reward actor -> group advantages -> DeepSpeed learner ->
weights back to the pool -> MLflow, with checkpoints. Stage 1 (SFT) runs first on the same learner."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import time
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from learner.group import LearnerGroup
from policy.build import build_tokenizer
from policy.tokenizer import special_token_ids
from recipes import get_recipe
from services import checkpoint, clip_fit, control, inflight, stop, vae_fit
from services.cluster import start_ray, worker_pool
from services.config import RunConfig
from services.delivery import GroupDelivery
from services.evaluate import EvalReport, compare, evaluate, evaluate_report, log_report
from services.pipeline import RolloutPipeline, rollout_seed
from services.reward_backend import start_reward
from services.step_batch import assemble
from services.tracking import Tracker, image_strip, plot_curves
from sync.group import CollectiveGroup
from tasks import build_dataset
from tasks.sampler import PromptSampler

log = logging.getLogger(__name__)


def task_dataset(cfg: RunConfig, split: str, seed_offset: int = 0):
    t = cfg.task
    if t.name != "shapes_vqa":
        return build_dataset(t.name, path=t.path, on_bad_row=t.on_bad_row)
    return build_dataset(t.name, size=t.train_size if split == "train" else t.eval_size, seed=cfg.seed + seed_offset,
                         split=split, image_size=t.image_size, degradations=t.degradations, severities=t.severities,
                         degrade_prob=t.degrade_prob, question_types=t.question_types,
                         shuffle_choices=t.shuffle_choices)


class Run:
    """One training run's actors and state."""

    def __init__(self, cfg: RunConfig, resume: bool) -> None:
        self.cfg = cfg
        self.ckpt_root = Path(cfg.checkpoint.dir) / cfg.run_name
        self.resume_dir = None
        state = None
        if resume:
            self.resume_dir = checkpoint.latest(self.ckpt_root)
            if self.resume_dir is None:
                raise SystemExit(f"--resume: no complete checkpoint under {self.ckpt_root}")
            state = checkpoint.load_state(self.resume_dir)
        self.state = state
        start_ray(cfg)
        self.tracker = Tracker(cfg, run_id=state["mlflow_run_id"] if state else None)
        print(f"mlflow_run_id={self.tracker.run_id}", flush=True)  # `unigrpo submit` reads this line
        cfg = self.cfg = vae_fit.prepare(cfg, self.tracker)  # a tiny VAE fitted to the task's images, cached
        cfg = self.cfg = clip_fit.prepare(cfg, self.tracker)  # a tiny CLIP scorer fitted to them (fit: true)
        self.pad_id = special_token_ids(build_tokenizer(cfg.model))["pad"]
        self.train_set = task_dataset(cfg, "train")
        self.sampler = PromptSampler(self.train_set, cfg.rollout.prompts_per_step, cfg.seed)
        L = cfg.learner
        self.learner = LearnerGroup(
            cfg.model, L, cfg.algorithm, cfg.sft, cfg.seed,
            cfg.cluster.learner_resource if cfg.cluster.use_custom_resources else None, cfg.rollout.sde)
        self.learner.call_all("set_sampling", cfg.rollout.temperature, cfg.rollout.sde.noise_level)
        self.reward = start_reward(cfg)  # reward.backend: actor | serve (services/reward_backend.py)
        self.pool = worker_pool(cfg, cfg.rollout.num_workers)
        a = cfg.algorithm  # async: up to max_staleness batches generated ahead of the learner
        self.pipeline = RolloutPipeline(self, a.max_staleness) if a.mode == "async" else None
        self.sync_group = (CollectiveGroup(self.learner.workers[0], L.sync.timeout_s)
                           if L.sync.backend == "nccl" else None)  # sync/group.py: the driver owns it
        self.sync_group_delivery = GroupDelivery(self) if self.sync_group is not None else None
        self.supervisor = control.RunSupervisor(self)  # `unigrpo scale`, autoscale, core-actor failures
        self.step = 0
        self.version = 0
        self.phase = "setup"  # what the learner holds (control.RunSupervisor): setup | rollout | learn | done

    # ---- stage 1 ----------------------------------------------------------------------------
    def sft(self) -> None:
        s = self.cfg.sft
        sampler = PromptSampler(self.train_set, s.batch_size, self.cfg.seed + 1)
        self.learner.call_all("set_lr", s.lr)
        bar = tqdm(range(s.steps), desc="stage 1 (SFT)", unit="step", dynamic_ncols=True)
        for i in bar:
            examples = get_recipe(self.cfg.recipe).sft_examples(sampler.next_batch(), s.generate_prob)  # CLEAR, GvU
            m = self.learner.sft_step(examples)
            if i % 10 == 0 or i == s.steps - 1:
                self.tracker.log_metrics(m, i)
                bar.set_postfix(ce=f"{m['sft/text_ce']:.3f}", fm=f"{m.get('sft/flow_mse', 0):.3f}")
        L = self.cfg.learner
        self.learner.call_all("set_lr", L.lr, self.cfg.sft.reset_optimizer, L.lm_lr_scale, L.generator_lr_scale)

    # ---- stage 2 ----------------------------------------------------------------------------
    def publish(self, bump: bool = True):
        """The learner's weights as the next version (``bump``) or again as the current one; its handle
        (collective sync: staged on the learner until ``deliver`` sends it)."""
        handle = self.learner.publish(bump)
        self.version = handle.version
        return handle

    def deliver(self, handle) -> None:
        """Every rollout worker, and a reward that scores with the policy (GvU), loads ``handle``.
        Collective sync: over the weight group, (re)built over the members that are up first."""
        timeout = self.cfg.learner.sync.timeout_s
        rollout = None
        if self.sync_group is not None:
            self.sync_group_delivery.ensure()
            handle = self.sync_group.stamp(handle)
            rollout = [k[1:] for k in self.sync_group.keys if k[0] == "rollout"]
        # the reward gets the SAME handle as the rollout workers, in parallel
        with cf.ThreadPoolExecutor(1) as ex:
            pending = ex.submit(self.reward.update_weights, handle, timeout) if self.reward.follows_policy else None
            sent = None if self.sync_group is None else self.sync_group.send(handle, timeout)
            self.pool.sync(handle) if rollout is None else self.pool.sync(handle, rollout)
            if pending is not None:
                pending.result(timeout=timeout + self.cfg.rollout.call_timeout_s)
            if sent is not None:
                ray.get(sent, timeout=timeout + self.cfg.rollout.call_timeout_s)

    def publish_and_sync(self, bump: bool = True) -> float:
        """Publish and deliver (``sync_version``); seconds taken."""
        t0 = time.perf_counter()
        self.sync_version(self.publish(bump))
        return time.perf_counter() - t0

    def sync_version(self, handle) -> float:
        """Deliver ``handle``; seconds taken. Collective sync: a broadcast that fails (a member died during
        it) is sent again, the same staged version, to a group rebuilt without the members lost
        (``services.delivery``)."""
        t0 = time.perf_counter()
        if self.sync_group is None:
            self.deliver(handle)
        else:
            self.sync_group_delivery.with_retries(self.deliver, handle)
        return time.perf_counter() - t0

    def last_batch_before_pause(self, step: int) -> int:
        """The last step the async pipeline may fill up to from ``step``: nothing is in flight at a
        checkpoint, an evaluation or the end (``services.pipeline``)."""
        cfg, last = self.cfg, self.cfg.algorithm.steps - 1
        for every in (cfg.checkpoint.every, cfg.algorithm.eval_every):
            if every:
                last = min(last, (step // every + 1) * every - 1)
        return last

    def rl_step(self) -> dict[str, float]:
        """One GRPO step: rollout (sync mode) or the pipeline's batch for this step (async), rewards,
        advantages, the learner step, the new weights to the pool; the step's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.phase = "rollout"
        step = self.step
        if self.pipeline is None:
            items = self.sampler.next_batch()
            trajs = self.pool.generate(get_recipe(cfg.recipe).requests(items), rollout_seed(cfg.seed, step))
            t1 = time.perf_counter()
            totals, comps = self.reward.score_values(trajs)
            timing = {"time/rollout_s": t1 - t0, "time/reward_s": time.perf_counter() - t1}
            pool = None
        else:
            self.pipeline.fill(step, self.last_batch_before_pause(step))
            items, (trajs, totals, comps, done) = self.pipeline.take(step, cfg.rollout.call_timeout_s * 4)
            timing = {"time/rollout_wait_s": time.perf_counter() - t0, "time/rollout_s": done["rollout_s"],
                      "time/reward_s": done["reward_s"]}
            pool = done["pool"]
        t2 = time.perf_counter()
        batch = assemble(trajs, totals, comps, cfg, self.version)
        m = batch.metrics
        self.phase = "learn"
        if batch.kept:
            m.update(self.learner.train_step(batch.collate(self.pad_id)))
        self.step += 1  # the learner holds this step: a failure from here on saves the post-step state
        self.phase = "done"
        m["learn/trained_samples"] = float(len(batch.kept))
        t3 = time.perf_counter()
        if self.pipeline is None:
            m["time/sync_s"] = self.publish_and_sync()
        else:  # the new version reaches the pool behind the batches already queued, then the next ones start
            self.pipeline.deliver_later(self.publish())
            if self.step < cfg.algorithm.steps:
                self.pipeline.fill(self.step, self.last_batch_before_pause(self.step))
            m["time/sync_s"] = self.pipeline.last_sync_s
        t4 = time.perf_counter()
        m.update(timing)
        m.update({"time/learn_s": t3 - t2, "time/step_s": t4 - t0, "samples_per_s": len(trajs) / (t4 - t0),
                  "policy_version": self.version})
        m.update(self.pool.metrics() if pool is None else pool)
        if cfg.tracking.log_images_every and self.step % cfg.tracking.log_images_every == 0:
            self.log_samples(items, trajs)
        return m

    def log_samples(self, items, trajs) -> None:
        """Input image | generated image | clean source (those that exist), for trajectories that generated."""
        by_id = {i.prompt_id: i for i in items}
        shown = [t for t in trajs if t.generated_image][:4]
        for k, t in enumerate(shown):
            item = by_id[t.prompt_id]
            pix = self.pool.call("decode", t.generated()[None])  # latent or Janus VQ codes -> (1,3,H,W)
            tiles = [item.image, None, item.meta.get("clean_image")]  # prompt-only rows (TSV) have no image
            side = next((tuple(x.shape[:2]) for x in tiles if x is not None), tuple(pix.shape[-2:]))
            if tuple(pix.shape[-2:]) != side:  # e.g. a tiny Janus decodes 8x8 images: match the strip
                pix = torch.nn.functional.interpolate(pix, size=side, mode="nearest")
            tiles[1] = (pix[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            self.tracker.log_image(image_strip([x for x in tiles if x is not None]),
                                   f"samples/step_{self.step:05d}_{k}.png")

    # ---- checkpoints ------------------------------------------------------------------------
    def served_sampler_state(self) -> dict:
        """The sampler position counting only batches trained on (async: not those in flight)."""
        inflight = None if self.pipeline is None else self.pipeline.served_sampler_state()
        return self.sampler.state_dict() if inflight is None else inflight

    def settle(self) -> None:
        """Async: wait until the pipeline's queued jobs are done (the pool then holds the last version)."""
        if self.pipeline is not None:
            self.pipeline.drain(self.cfg.rollout.call_timeout_s * 4)

    def save(self, wait_s: float | None = None) -> Path:
        """A checkpoint of the learner's state; async: with the batches in flight that a resume could not
        generate again (``RolloutPipeline.carry``, each waited for at most ``wait_s``, default a rollout wait)."""
        wait_s = self.cfg.rollout.call_timeout_s * 4 if wait_s is None else wait_s
        carried = [] if self.pipeline is None else self.pipeline.carry(self.version, wait_s)
        state = {"sampler": self.served_sampler_state(), "rng": checkpoint.rng_state(), "policy_version": self.version,
                 "mlflow_run_id": self.tracker.run_id, "run_name": self.cfg.run_name,
                 "carried_steps": [b.step for b in carried]}

        def payload(d: str) -> None:
            self.learner.call_all("save", d)
            inflight.write(d, carried)

        return checkpoint.save(self.ckpt_root, self.step, state, payload, self.cfg.checkpoint.keep)

    def restore(self) -> None:
        self.learner.call_all("load", str(self.resume_dir))
        carried = inflight.read(self.resume_dir)
        if self.pipeline is not None:
            self.pipeline.restore(carried)
        elif carried:
            log.warning("the checkpoint carries %d async batches; sync mode draws their prompts again", len(carried))
        self.sampler.load_state_dict(self.state["sampler"])
        checkpoint.restore_rng(self.state["rng"])
        self.step = int(self.state["step"])

    def shutdown(self) -> None:
        if self.pipeline is not None:
            self.pipeline.shutdown()
        self.pool.shutdown()
        self.learner.shutdown()
        self.reward.shutdown()


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Run stage 1 (unless resuming past it) and stage 2 to ``algorithm.steps``; returns a summary.

    Ctrl-C / SIGTERM (``services.stop``) lets the GRPO step in flight finish (a few seconds at most), writes a
    checkpoint of the last trained step, shuts everything down (a local Ray cluster this call started too)
    and raises ``stop.Interrupted`` with one line naming the checkpoint to ``--resume`` from."""
    torch.manual_seed(cfg.seed)
    owns_ray = start_ray(cfg)
    stop.install()  # after ray.init, which replaces the SIGTERM handler
    try:
        return _train(cfg, resume)
    finally:
        if owns_ray and ray.is_initialized():
            with stop.ignored():
                ray.shutdown()


def _train(cfg: RunConfig, resume: bool) -> dict:
    run = Run(cfg, resume)
    summary: dict = {"run_id": run.tracker.run_id}
    status = "FAILED"
    guard = stop.StepGuard()
    try:
        if resume:
            run.restore()
        else:
            if cfg.sft.enabled and cfg.sft.steps:
                run.sft()
            run.learner.call_all("snapshot_reference")
        run.publish_and_sync(bump=not resume)
        run.phase = "done"
        stage1 = None
        if not resume:
            stage1 = evaluate_report(run.pool, cfg, reward=run.reward)
            log_report(run.tracker, stage1, 0, _out_dir(run), "_stage1")
            summary["stage1"] = stage1.metrics
        bar = tqdm(range(run.step, cfg.algorithm.steps), desc="stage 2 (GRPO)", unit="step", dynamic_ncols=True)
        for _ in bar:
            with guard.step():
                run.supervisor.before_step()
                m = run.rl_step()
                run.supervisor.after_step(m)
                run.tracker.log_metrics(m, run.step)
                if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0:
                    run.save()
            guard.check()
            bar.set_postfix(reward=f"{m['reward/total/mean']:.3f}", step_s=f"{m['time/step_s']:.1f}")
            if cfg.algorithm.eval_every and run.step % cfg.algorithm.eval_every == 0 and run.step < cfg.algorithm.steps:
                run.settle()
                run.tracker.log_metrics(evaluate(run.pool, cfg, reward=run.reward, full=False), run.step)
        run.settle()
        final = evaluate_report(run.pool, cfg, reward=run.reward)
        stage1 = stage1 or _saved_report(run, "_stage1")  # resumed: stage 1's report from its JSON
        paired = compare(stage1, final, cfg.evaluation.bootstrap_samples, cfg.seed) if stage1 else {}
        log_report(run.tracker, final, run.step, _out_dir(run), "_final", paired)
        summary.update(final=final.metrics, comparison=paired)
        if cfg.tracking.log_model != "none":  # the final policy: the last step's checkpoint (written if not yet)
            done = run.ckpt_root / f"step-{run.step:06d}"
            run.tracker.log_policy((done if (done / checkpoint.MARKER).exists() else run.save()) / "policy")
        _curves(run)
        _print_eval(summary)
        status = "FINISHED"
    except control.CORE_FAILURES as e:  # a dead learner / reward actor: one line, resumable checkpoint
        raise SystemExit(run.supervisor.failed(e)) from None
    except KeyboardInterrupt as e:
        status = "KILLED"
        raise stop.Interrupted(stop.signum_of(e), _stopped(run)) from None
    except Exception as e:  # any other failure: the same consistent checkpoint, then the error itself
        e.add_note(run.supervisor.failed(e))
        raise
    finally:
        with stop.ignored():
            run.tracker.end(status)
            run.shutdown()
    summary["steps"] = run.step
    return summary


def _stopped(run: Run) -> str:
    """Write a checkpoint consistent with what the learner holds (``RunSupervisor.save_consistent``: by
    ``run.phase``), unless written already; the line to stop with."""
    saved = None
    try:
        saved = run.supervisor.save_consistent()
    except Exception as e:  # noqa: BLE001 - an interrupted run still stops; the last checkpoint stays
        log.warning("could not save a checkpoint on the way out: %s", control.one_line(e))
    latest = saved or checkpoint.latest(run.ckpt_root)
    where = (f"resume from {latest} with `unigrpo train --resume` (same config)" if latest
             else "no checkpoint to resume from yet")
    return f"run {run.cfg.run_name!r} interrupted at step {run.step}; {where}"


def _out_dir(run: Run) -> Path:
    """Where a run's plots and eval reports go: ``runs/<run_name>/``."""
    return Path("runs") / run.cfg.run_name


def _saved_report(run: Run, suffix: str) -> EvalReport | None:
    path = _out_dir(run) / f"eval{suffix}.json"
    return EvalReport.from_json(json.loads(path.read_text())) if path.is_file() else None


def _curves(run: Run) -> None:
    out = _out_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("reward/total/mean", "accuracy", "eval/severity3/accuracy", "eval/heldout/reward/total")
    series = {k: run.tracker.history(k) for k in keys}
    fig = plot_curves(series, f"{run.cfg.run_name}: reward during GRPO", out / "reward_curve.png")
    run.tracker.log_figure(fig, "plots/reward_curve.png")


def _print_eval(summary: dict) -> None:
    """One line per held-out metric: stage 1 -> final (what a person checks after `unigrpo train`)."""
    before, after = summary.get("stage1", {}), summary.get("final", {})
    for k in sorted(after):
        if k.endswith(("accuracy", "trigger_rate", "psnr_db", "ssim")) or "/reward/" in k:
            start = f"{before[k]:.3f} -> " if k in before else ""
            print(f"{k}: {start}{after[k]:.3f}")
    paired = summary.get("comparison") or {}
    for k in sorted(paired):
        if k.endswith("/diff"):
            base = k.removesuffix("/diff")
            exact = f"exact McNemar p = {paired[base + '/mcnemar_p']:.4g}, " if base + "/mcnemar_p" in paired else ""
            print(f"{base} (stage 2 - stage 1): {paired[k]:+.3f}, {exact}bootstrap p = {paired[base + '/bootstrap_p']:.4g}")
