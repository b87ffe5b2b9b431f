"""Figures of an evaluation report (``services.evaluate.EvalReport.severity_table``), PNG files via matplotlib
(Agg): accuracy and generation trigger rate by degradation severity (CLEAR's Figure 5 in shape), and
restoration quality by severity. Each returns the figure, or None when the table holds nothing to draw."""

from __future__ import annotations

from pathlib import Path

MODE_STYLE = {"greedy": ("as chosen, greedy", "-o"), "sampled": ("as chosen, sampled", "--o"),
              "forced": ("generation forced", "-s"), "forbidden": ("generation forbidden", "-x")}


def _severity(set_name: str) -> int:
    return 0 if set_name == "clean" else int(set_name.removeprefix("severity"))


def _ordered(table: dict) -> list[tuple[int, str]]:
    """CLEAR's sets (clean, severity<s>) by severity; other sets (UAE / GvU's heldout) are not plotted here."""
    return sorted((_severity(name), name) for name in table
                  if name == "clean" or (name.startswith("severity") and name[8:].isdigit()))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_generation_by_severity(table: dict[str, dict[str, dict[str, float]]], title: str, out_png: str | Path):
    """Left: accuracy by severity (0 = clean) per mode; right: trigger rate by severity as the model chooses
    (greedy and sampled), the shape of CLEAR's Figure 5."""
    sets = _ordered(table)
    if not sets:
        return None
    plt = _pyplot()
    fig, (acc, trig) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    xs = [s for s, _ in sets]
    for mode, (label, style) in MODE_STYLE.items():
        ys = [table[name].get(mode, {}).get("accuracy") for _, name in sets]
        if any(y is not None for y in ys):
            acc.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], style, label=label)
        if mode in ("greedy", "sampled"):
            ts = [table[name].get(mode, {}).get("trigger_rate") for _, name in sets]
            if any(t is not None for t in ts):
                trig.plot([x for x, t in zip(xs, ts) if t is not None], [t for t in ts if t is not None], style,
                          label=label)
    for ax, name in ((acc, "answer accuracy"), (trig, "generation trigger rate")):
        ax.set_xticks(xs, ["clean" if x == 0 else str(x) for x in xs])
        ax.set_xlabel("degradation severity")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, title, out_png)


def _save(plt, fig, title: str, out_png: str | Path):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return fig


def plot_restoration(table: dict[str, dict[str, dict[str, float]]], title: str, out_png: str | Path):
    """PSNR (left) and SSIM (right) against the clean image by severity: the degraded input and the decoded
    generation (forced mode)."""
    sets = [(s, name) for s, name in _ordered(table) if "restoration" in table[name] and s > 0]
    if not sets:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    xs = list(range(len(sets)))
    for ax, metric, unit in ((axes[0], "psnr_db", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        inp = [table[name].get("input", {}).get(metric, float("nan")) for _, name in sets]
        gen = [table[name]["restoration"].get(metric, float("nan")) for _, name in sets]
        ax.bar([x - 0.2 for x in xs], inp, width=0.4, label="degraded input", color="#c44e52")
        ax.bar([x + 0.2 for x in xs], gen, width=0.4, label="restoration (decoded generation)", color="#4c72b0")
        for x, a, b in zip(xs, inp, gen):
            ax.text(x - 0.2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=7)
            ax.text(x + 0.2, b, f"{b:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, [str(s) for s, _ in sets])
        ax.set_xlabel("degradation severity")
        ax.set_title(f"{unit} against the clean image")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return _save(plt, fig, title, out_png)
