"""The embedded default run, whole, as a new user starts it: wall time and peak memory per seed against the
budgets the default is held to (10 minutes, 8 GiB on a 2-core CPU box).

Each seed is ``unigrpo train --set seed=S`` in its own process with a fresh checkpoint directory (so the
tiny VAE fit is included) and MLflow in a temporary SQLite file; memory is the sampled sum of the resident
sets of that process and every process under it (the local Ray cluster it starts: GCS, raylet, workers,
actors). Shared pages (the object store, libraries) count once per process, so the sum over-counts.
Run it with the machine otherwise idle: a second run on the same cores doubles the wall time.

    python -m bench.default_run [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from bench.common import PeakMemory

WALL_BUDGET_S = 600.0
MEMORY_BUDGET_GIB = 8.0


def run_seed(seed: int) -> tuple[int, float, float]:
    """(exit code, wall seconds, process-tree peak GiB) of one default run."""
    tmp = tempfile.mkdtemp(prefix="unigrpo-bench-default-")
    argv = [sys.executable, "-m", "services.cli", "train", "--set", f"seed={seed}",
            "--set", f"run_name=bench-default-seed{seed}", "--set", f"checkpoint.dir={tmp}/checkpoints",
            "--set", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
    with PeakMemory(interval_s=0.5) as mem:
        t0 = time.perf_counter()
        code = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
        wall = time.perf_counter() - t0
    return code, wall, mem.tree_peak / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each a whole run (default: 0)")
    args = p.parse_args(argv)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        code, wall, peak = run_seed(seed)
        rows.append((seed, code, wall, peak))
        minutes, seconds = divmod(round(wall), 60)
        print(f"seed {seed}: exit {code}, wall {minutes}:{seconds:02d} ({wall:.0f} s), "
              f"process-tree peak {peak:.2f} GiB", flush=True)
    worst_wall = max(r[2] for r in rows)
    worst_peak = max(r[3] for r in rows)
    failed = [r[0] for r in rows if r[1] != 0]
    print(f"default run: slowest {worst_wall / WALL_BUDGET_S:.2f}x of the {WALL_BUDGET_S / 60:.0f}-minute budget, "
          f"largest peak {worst_peak / MEMORY_BUDGET_GIB:.2f}x of {MEMORY_BUDGET_GIB:.0f} GiB"
          + (f"; FAILED seeds {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
