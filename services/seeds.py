"""``unigrpo seeds``: one config trained once per seed, and the evaluations of the runs gathered into one table.

Each seed runs ``unigrpo train --config C --set seed=S --set run_name=<run_name>-seed<S>`` (plus the given
``--set`` overrides) in a process of its own, one after another. Its final evaluation
(``runs/<run_name>-seed<S>/eval_final.json``, written when the run evaluates after stage 1 and after stage 2)
gives, per held-out set and decoding mode, the change stage 2 - stage 1 and its exact McNemar p on the same
items (UAE / GvU: the held-out reward's change and its paired bootstrap p). The table has one row per (set, mode): each seed's change and p, then the mean and the sample standard
deviation of the change over seeds, and how many seeds show a rise with p < 0.05. Rows for "forced - forbidden"
(after stage 2), the sampled trigger rate, and each set's accuracy per mode and restoration PSNR after stage 2
come from each run's final metrics. ``--against REF`` adds rows ``vs REF: <set>/<mode>``: each seed's answers after
stage 2 paired with those of run ``REF-seed<S>`` on the same items (this run - REF, exact McNemar p), which is how
an ablation is compared with the default. ``--gather-only`` tabulates runs already trained and trains nothing.
Written as ``seeds.json`` and ``seeds.md`` in ``--out``, the Markdown also printed.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ALPHA = 0.05


@dataclass
class SeedRow:
    """One quantity over seeds: per seed (value, p or None), and its mean / spread over seeds."""

    name: str
    values: dict[int, float] = field(default_factory=dict)
    p: dict[int, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values()) if self.values else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else 0.0

    @property
    def significant_rises(self) -> int:
        """Seeds whose value is > 0 with p < ALPHA."""
        return sum(1 for s, v in self.values.items() if v > 0 and self.p.get(s, 1.0) < ALPHA)


def seed_table(evals: dict[int, dict]) -> list[SeedRow]:
    """Rows from each seed's ``eval_final.json`` content (``comparison`` and ``metrics``), in a stable order."""
    rows: dict[str, SeedRow] = {}

    def put(name: str, seed: int, value: float, p: float | None) -> None:
        row = rows.setdefault(name, SeedRow(name))
        row.values[seed] = float(value)
        if p is not None:
            row.p[seed] = float(p)

    for seed, ev in sorted(evals.items()):
        comparison, metrics = ev.get("comparison") or {}, ev.get("metrics") or {}
        for key, diff in comparison.items():  # compare/<set>/<mode>/diff
            if key.endswith("/diff"):
                stem = key[: -len("/diff")]
                p = comparison.get(f"{stem}/mcnemar_p", comparison.get(f"{stem}/bootstrap_p"))  # a score: bootstrap
                put(f"stage 2 - stage 1: {stem.removeprefix('compare/')}", seed, diff, p)
        for key, diff in metrics.items():  # eval/<set>/forced_vs_forbidden/diff
            if key.endswith("/forced_vs_forbidden/diff"):
                stem = key[: -len("/diff")]
                put(f"forced - forbidden: {stem.split('/')[1]}", seed, diff, metrics.get(f"{stem}/mcnemar_p"))
            elif key.endswith("/sampled/trigger_rate"):
                put(f"trigger rate, sampled: {key.split('/')[1]}", seed, diff, None)
            elif key.endswith("/accuracy"):  # eval/<set>/accuracy (greedy) or eval/<set>/<mode>/accuracy
                parts = key.split("/")
                put(f"after stage 2: {parts[1]}/{parts[2] if len(parts) == 4 else 'greedy'} accuracy", seed, diff, None)
            elif key.endswith("/restoration/psnr_db"):
                put(f"after stage 2: {key.split('/')[1]} restoration PSNR (dB)", seed, diff, None)
    return sorted(rows.values(), key=lambda r: r.name)


def against_rows(evals: dict[int, dict], refs: dict[int, dict], ref_name: str) -> list[SeedRow]:
    """Rows ``vs <ref_name>: <set>/<mode>``: per seed, the final answers of ``evals[seed]`` paired with those of
    ``refs[seed]`` on the same items (accuracy difference this - reference, exact McNemar p); a set whose items
    differ between the two is left out."""
    from services.stats import discordant, mcnemar_exact

    rows: dict[str, SeedRow] = {}
    for seed, ev in sorted(evals.items()):
        ref_items = refs[seed].get("items") or {}
        for name, item in (ev.get("items") or {}).items():
            ref = ref_items.get(name)
            if ref is None or ref.get("prompt_ids") != item.get("prompt_ids"):
                continue
            for mode, correct in (item.get("correct") or {}).items():
                before = (ref.get("correct") or {}).get(mode)
                if before is None or len(before) != len(correct):
                    continue
                b, c = discordant(before, correct)
                row = rows.setdefault(f"vs {ref_name}: {name}/{mode}", SeedRow(f"vs {ref_name}: {name}/{mode}"))
                row.values[seed] = (c - b) / max(1, len(correct))  # accuracy after - before
                row.p[seed] = mcnemar_exact(b, c)
    return sorted(rows.values(), key=lambda r: r.name)


def eval_path(run_name: str, seed: int) -> Path:
    """Where seed ``seed`` of ``run_name`` writes its final evaluation."""
    return Path("runs") / f"{run_name}-seed{seed}" / "eval_final.json"


def missing_seeds(run_name: str, seeds: list[int]) -> list[int]:
    """The seeds of ``run_name`` with no final evaluation on disk."""
    return [s for s in seeds if not eval_path(run_name, s).is_file()]


def gather(run_name: str, seeds: list[int]) -> dict[int, dict]:
    """Each seed's ``runs/<run_name>-seed<S>/eval_final.json``."""
    evals = {}
    for seed in seeds:
        path = eval_path(run_name, seed)
        if not path.is_file():
            raise FileNotFoundError(f"seed {seed}: {path} was not written (the run needs its stage-1 and final evals)")
        evals[seed] = json.loads(path.read_text())
    return evals


def format_markdown(rows: list[SeedRow]) -> str:
    seeds = sorted({s for r in rows for s in r.values})
    head = "| quantity | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | rises with p < 0.05 |"
    lines = [head, "|" + "---|" * (len(seeds) + 4)]
    for r in rows:
        cells = []
        for s in seeds:
            v = r.values.get(s)
            cells.append("" if v is None else f"{v:+.3f}" + (f" (p {r.p[s]:.2g})" if s in r.p else ""))
        rises = f"{r.significant_rises}/{len(r.values)}" if r.p else ""
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.mean:+.3f} | {r.sd:.3f} | {rises} |")
    return "\n".join(lines) + "\n"


def run_seeds(config: str | None, run_name: str, seeds: list[int], overrides: list[str], out: Path,
              train: bool = True, against: str | None = None) -> list[SeedRow]:
    """Train once per seed (each in its own process; none with ``train=False``), then gather and write the table
    (with ``against``'s rows when given)."""
    if against is not None:
        refs = gather(against, seeds)  # a missing reference fails before any training
    for i, seed in enumerate(seeds if train else [], start=1):
        name = f"{run_name}-seed{seed}"
        print(f"seed {seed} ({i}/{len(seeds)}): unigrpo train, run {name}", flush=True)
        argv = [sys.executable, "-m", "services.cli", "train", *(["--config", config] if config else []),
                *[a for o in overrides for a in ("--set", o)], "--set", f"seed={seed}", "--set", f"run_name={name}"]
        code = subprocess.run(argv, check=False).returncode
        if code != 0:
            raise RuntimeError(f"seed {seed}: unigrpo train exited {code}")
    evals = gather(run_name, seeds)
    rows = seed_table(evals) + (against_rows(evals, refs, against) if against is not None else [])
    out.mkdir(parents=True, exist_ok=True)
    table = format_markdown(rows)
    (out / "seeds.md").write_text(table)
    (out / "seeds.json").write_text(json.dumps(
        [asdict(r) | {"mean": r.mean, "sd": r.sd, "significant_rises": r.significant_rises} for r in rows], indent=2))
    print(table, end="")
    return rows
