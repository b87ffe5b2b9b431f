"""Run every benchmark in turn (each in its own process, so peak memory is per benchmark) and print
each one's last line (its ratio). ``make bench`` runs this.

    python -m bench.run_all [--only vs_trl,overhead]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHES = ["vs_trl", "overhead", "weight_sync", "logprob_recording", "async_vs_sync", "scaling", "learner_ranks",
           "default_run"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHES))
    args = p.parse_args(argv)
    summary, rc = [], 0
    for name in args.only.split(","):
        print(f"=== bench.{name}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", f"bench.{name}"], stdout=subprocess.PIPE, text=True)
        print(proc.stdout, end="", flush=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        mem = next((ln for ln in reversed(lines) if ln.startswith("peak memory")), "")
        last = lines[-1] if lines and proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        rc = rc or proc.returncode
        summary.append(f"{name:>18} ({time.perf_counter() - t0:5.0f} s): {last}  [{mem.removeprefix('peak memory: ')}]")
    print("=== summary")
    print("\n".join(summary))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
