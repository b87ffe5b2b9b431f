"""`unigrpo serve` and `unigrpo train` stop on SIGTERM within seconds, leave no process of their local Ray
cluster behind, and train leaves a checkpoint that `--resume` accepts."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from service_helpers import FAST_VAE_FIT

from services import checkpoint

ROOT = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 20

pytestmark = pytest.mark.slow


class Cli:
    """``python -m services.cli ARGS`` with its output collected by a thread (tqdm writes ``\\r``, not lines)."""

    def __init__(self, *args: str, cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_AUTO_CONNECT": "0"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            self.out += chunk

    def text(self) -> str:
        return self.out.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")

    def cluster(self) -> tuple[list[psutil.Process], str]:
        """The processes started under this CLI (Ray's gcs, raylet, agents, workers) and the session dir."""
        procs = psutil.Process(self.proc.pid).children(recursive=True)
        session = ""
        for p in procs:
            try:
                m = re.search(r"(/\S*/session_[\w\-.]+)", " ".join(p.cmdline()))
            except psutil.Error:
                continue
            if m:
                session = m.group(1)
                break
        assert session and any("raylet" in p.name() for p in procs), [p.name() for p in procs]
        return procs, session

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds to exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_WITHIN_S + 40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(timeout=10)
        return code, time.monotonic() - t0


def _assert_cluster_gone(procs: list[psutil.Process], session: str) -> None:
    deadline = time.monotonic() + 5  # a child may take a moment after its parent
    while True:
        left = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in psutil.process_iter(["cmdline"]):
            if session in " ".join(p.info["cmdline"] or []) and p not in left:
                left.append(p)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = [f"{p.pid}:{p.name()}" for p in left if p.is_running()]
    for p in left:
        p.kill()
    assert not names, f"left behind: {names}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_reward_stops_on_sigterm(tmp_path: Path) -> None:
    cli = Cli("serve", "reward", "--port", str(_free_port()), "--set", "reward.num_cpus=0.25",
              "--set", "cluster.num_cpus=2", cwd=tmp_path)
    cli.wait_for(r"serving GET http://\S+/healthz", timeout=180)
    procs, session = cli.cluster()
    code, took = cli.stop()
    assert code == 128 + signal.SIGTERM, cli.text()[-3000:]
    assert took < STOP_WITHIN_S, took
    assert "Traceback" not in cli.text() and "SIGTERM received" not in cli.text()
    assert cli.text().strip().splitlines()[-1] == "serve reward: stopped"
    _assert_cluster_gone(procs, session)


TINY = [*FAST_VAE_FIT, "sft.steps=2", "sft.batch_size=4", "algorithm.steps=50", "rollout.num_workers=1", "task.train_size=32",
        "task.eval_size=4", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "checkpoint.every=0", "algorithm.eval_every=0", "tracking.log_images_every=0", "reward.num_cpus=0.5"]


def test_train_stops_on_sigterm_with_a_resumable_checkpoint(tmp_path: Path) -> None:
    sets = [*TINY, "run_name=stop", f"checkpoint.dir={tmp_path}/ckpt", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    args = [a for s in sets for a in ("--set", s)]
    cli = Cli("train", *args, cwd=tmp_path)
    cli.wait_for(r"stage 2 \(GRPO\):[^\r\n]*?\b[2-9]/50", timeout=420)  # two GRPO steps done
    procs, session = cli.cluster()
    code, took = cli.stop()
    text = cli.text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert took < STOP_WITHIN_S, took
    assert "Traceback" not in text and "SIGTERM received" not in text
    last = text.strip().splitlines()[-1]
    assert "interrupted at step" in last and "--resume" in last, last
    _assert_cluster_gone(procs, session)

    # only checkpoint.every=0: the checkpoint is the one written on the way out, at the last trained step
    latest = checkpoint.latest(tmp_path / "ckpt" / "stop")
    assert latest is not None, text[-3000:]
    step = checkpoint.load_state(latest)["step"]
    assert step >= 2 and f"interrupted at step {step};" in last
    resumed = subprocess.run([sys.executable, "-m", "services.cli", "train", "--resume", *args,
                              "--set", f"algorithm.steps={step + 1}"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"stage 2 \(GRPO\):[^\r\n]*\b1/1\b", resumed.stderr)  # from the checkpoint's step: one left
    assert "stage 1" not in resumed.stderr
