"""``unigrpo seeds``: the table over seeds from hand-made evaluation files (values, mean, spread, significant
rises), its Markdown, the CLI's argument errors, and two real tiny runs gathered end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import FAST_VAE_FIT

from services.cli import main
from services.seeds import against_rows, format_markdown, seed_table

ROOT = Path(__file__).resolve().parents[1]


def _eval(diff: float, p: float, trigger: float) -> dict:
    return {"comparison": {"compare/severity3/greedy/diff": diff, "compare/severity3/greedy/mcnemar_p": p,
                           "compare/severity3/greedy/n": 400.0},
            "metrics": {"eval/severity3/sampled/trigger_rate": trigger, "eval/severity3/forced_vs_forbidden/diff": -diff,
                        "eval/severity3/forced_vs_forbidden/mcnemar_p": 0.5, "eval/severity3/accuracy": 0.7,
                        "eval/severity3/forced/accuracy": 0.7 + diff, "eval/severity3/restoration/psnr_db": 21.0}}


def test_table_over_seeds_has_each_seed_the_mean_the_spread_and_the_significant_rises():
    rows = {r.name: r for r in seed_table({0: _eval(0.04, 0.01, 0.3), 1: _eval(0.02, 0.2, 0.2), 2: _eval(-0.01, 0.03, 0.1)})}
    assert set(rows) == {"stage 2 - stage 1: severity3/greedy", "forced - forbidden: severity3",
                         "trigger rate, sampled: severity3", "after stage 2: severity3/greedy accuracy",
                         "after stage 2: severity3/forced accuracy", "after stage 2: severity3 restoration PSNR (dB)"}
    assert rows["after stage 2: severity3/forced accuracy"].values == {0: 0.74, 1: 0.72, 2: 0.69}
    assert rows["after stage 2: severity3 restoration PSNR (dB)"].mean == pytest.approx(21.0)
    change = rows["stage 2 - stage 1: severity3/greedy"]
    assert change.values == {0: 0.04, 1: 0.02, 2: -0.01} and change.p == {0: 0.01, 1: 0.2, 2: 0.03}
    assert change.mean == pytest.approx(0.05 / 3) and change.sd == pytest.approx(0.025166, abs=1e-6)
    assert change.significant_rises == 1  # seed 2's p < 0.05 is a drop; seed 1's rise is not significant
    assert rows["trigger rate, sampled: severity3"].p == {} and rows["forced - forbidden: severity3"].significant_rises == 0
    md = format_markdown(list(rows.values()))
    assert "| seed 0 | seed 1 | seed 2 | mean | sd |" in md and "+0.040 (p 0.01)" in md and "| 1/3 |" in md


def _answers(ids: list[str], greedy: list[bool]) -> dict:
    return {"items": {"severity3": {"prompt_ids": ids, "correct": {"greedy": greedy}}}, "metrics": {}, "comparison": {}}


def test_against_pairs_each_seed_with_the_reference_on_the_same_items():
    ids = [f"p{i}" for i in range(20)]
    ref = {0: _answers(ids, [False] * 10 + [True] * 10), 1: _answers(ids, [True] * 20)}
    var = {0: _answers(ids, [True] * 20), 1: _answers(ids, [True] * 19 + [False])}
    rows = {r.name: r for r in against_rows(var, ref, "clear-tiny")}
    row = rows["vs clear-tiny: severity3/greedy"]
    assert row.values == {0: pytest.approx(0.5), 1: pytest.approx(-0.05)}
    assert row.p[0] == pytest.approx(2 * 0.5**10) and row.p[1] == 1.0  # b=0, c=10 exact; one discordant item
    assert row.significant_rises == 1
    other = {0: _answers([f"q{i}" for i in range(20)], [True] * 20)}  # other items: nothing to pair
    assert against_rows(other, ref, "clear-tiny") == []


def test_gather_only_tabulates_runs_already_trained_against_a_reference(tmp_path, monkeypatch, capsys):
    ids = [f"p{i}" for i in range(20)]
    for name, correct in (("abl-x", [True] * 20), ("clear-tiny", [False] * 10 + [True] * 10)):
        for seed in (0, 1):
            d = tmp_path / "runs" / f"{name}-seed{seed}"
            d.mkdir(parents=True)
            (d / "eval_final.json").write_text(json.dumps(_answers(ids, correct)))
    monkeypatch.chdir(tmp_path)
    assert main(["seeds", "--seeds", "0,1", "--set", "run_name=abl-x", "--gather-only", "--against", "clear-tiny",
                 "--out", "out"]) == 0
    assert "| vs clear-tiny: severity3/greedy | +0.500 (p 0.002) | +0.500 (p 0.002) |" in (tmp_path / "out" / "seeds.md").read_text()
    with pytest.raises(SystemExit) as e:
        main(["seeds", "--seeds", "0,2", "--set", "run_name=abl-x", "--gather-only", "--out", "out"])
    assert e.value.code == 2 and "--gather-only" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [(["--seeds", "a,b"], "comma-separated integers"),
                                         (["--seeds", "1,1"], "distinct"),
                                         (["--set", "rollout.group_size=0"], "rollout.group_size"),
                                         (["--against", "no-such-run"], "--against")])
def test_bad_arguments_exit_2_before_any_run(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(["seeds", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count("\n") == 1


@pytest.mark.slow
def test_two_tiny_seeds_run_and_are_gathered(tmp_path):
    tiny = [*FAST_VAE_FIT, "task.train_size=32", "task.eval_size=4", "rollout.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.num_workers=1", "algorithm.steps=1",
            "algorithm.eval_every=0", "sft.steps=2", "sft.batch_size=4", "reward.num_cpus=0.5",
            "tracking.log_images_every=0", f"tracking.uri=sqlite:///{tmp_path}/seeds.db", f"checkpoint.dir={tmp_path}/ckpt"]
    argv = [sys.executable, "-m", "services.cli", "seeds", "--seeds", "0,1", "--out", str(tmp_path / "out")]
    res = subprocess.run([*argv, *[a for o in tiny for a in ("--set", o)]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "seeds.json").read_text())
    change = next(r for r in rows if r["name"] == "stage 2 - stage 1: severity3/greedy")
    assert set(change["values"]) == {"0", "1"} and all(0 <= p <= 1 for p in change["p"].values())
    assert (tmp_path / "runs" / "clear-tiny-seed1" / "eval_final.json").is_file()
    assert "| seed 0 | seed 1 |" in res.stdout and "stage 2 - stage 1: clean/greedy" in res.stdout
