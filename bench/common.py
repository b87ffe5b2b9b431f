"""Shared pieces of the benchmarks: configs, a text-only prompt set, peak memory, medians, the last line.

Every benchmark measures its A and B side by side in ONE process run, interleaving repetitions
(A, B, A, B, ...), and reports medians: the box is shared and noisy, so only ratios measured together
mean anything.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A larger Qwen2 than the tiny default (64 wide, 2 layers): 256 wide, 4 layers, about 3.4M parameters
# with the 512-token vocabulary. One TRL GRPO step on it takes several seconds on a 2-core CPU, and each
# benchmark still fits in ~3 minutes.
MEDIUM_LM = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 768}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray's raylet and workers are
    descendants of a driver that started a local cluster), sampled every ``interval_s``; plus the
    kernel's ru_maxrss of this process and of its reaped children."""

    def __init__(self, interval_s: float = 0.25) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.tree_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        total = 0
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except Exception:
            return
        for p in procs:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        self.tree_peak = max(self.tree_peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def line(self) -> str:
        self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return (f"peak memory: process tree {self.tree_peak / 2**20:.0f} MiB (sampled sum of RSS); "
                f"ru_maxrss self {self_kb / 1024:.0f} MiB, children {child_kb / 1024:.0f} MiB")


def text_task(n: int = 256, seed: int = 0) -> str:
    """A text-only JSONL prompt set (the shapes-VQA questions with their choices, no image): the task
    TRL and unigrpo both run in ``bench.vs_trl``. Returns the file path."""
    from tasks import build_dataset

    d = Path(tempfile.mkdtemp(prefix="unigrpo-bench-task-"))
    rows = build_dataset("shapes_vqa", size=n, seed=seed, split="train", image_size=32)
    with open(d / "text.jsonl", "w") as f:
        for i, it in enumerate(rows):
            f.write(json.dumps({"id": f"t{i}", "image": None, "question": it.question, "choices": it.choices,
                                "answer": it.answer}) + "\n")
    return str(d / "text.jsonl")


def bench_config(changes: dict[str, Any] | None = None, lm: dict | None = None):
    """The embedded default with no SFT, no checkpoints, no sample images, group size 4, MLflow in a
    temporary SQLite file, plus ``changes`` ({"rollout.max_new_tokens": 32, ...}) and ``lm`` (model.lm_tiny)."""
    from services.config import load_config, validate_config

    data = load_config().model_dump()
    tmp = tempfile.mkdtemp(prefix="unigrpo-bench-")
    base = {"sft.enabled": False, "checkpoint.every": 0, "tracking.log_images_every": 0,
            "tracking.uri": f"sqlite:///{tmp}/mlflow.db", "checkpoint.dir": f"{tmp}/ckpt",
            "algorithm.steps": 10**6, "run_name": "bench", "rollout.group_size": 4}
    for key, value in {**base, **(changes or {})}.items():
        node = data
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    if lm:
        data["model"]["lm_tiny"] = dict(lm)
    return validate_config(data)


def start_run(cfg):
    """A ready ``services.driver.Run``: reference snapshot, weights version 1 on every worker."""
    from services.driver import Run

    run = Run(cfg, resume=False)
    run.learner.call_all("snapshot_reference")
    run.publish_and_sync()
    return run


def stop_run(run) -> None:
    """End the run and stop the local Ray cluster it started: an idle cluster (raylet, GCS, agents, idle
    actors) still takes ~10% of a core here, which would slow whatever is measured next in this process."""
    import ray

    try:
        run.tracker.end("FINISHED")
    finally:
        run.shutdown()
        ray.shutdown()


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.t0


def machine() -> str:
    import platform

    import torch

    return (f"{platform.node()}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, load avg "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def quiet() -> None:
    """Silence library warnings and transformers' logging, then print the machine line."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(machine(), flush=True)
