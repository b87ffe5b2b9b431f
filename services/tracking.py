"""MLflow tracking from the driver alone: one run per training (resumed runs continue it), the flattened
config as params, per-step metrics, images and plots as artifacts, the driver node's system metrics
(``system/*``: CPU, memory, disk, network; GPU with ``nvidia-ml-py`` and a GPU), and the final policy when
``tracking.log_model`` asks for it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from services.config import RunConfig, flatten, to_yaml

# System metrics: a sample every 2 s, logged as the mean of 3 (a point per 6 s suits runs of minutes to
# hours). MLflow's own environment variables win; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off.
SYSTEM_METRICS_ENV = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2",
                      "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "3"}
POLICY_ARTIFACT = "policy"


class Tracker:
    def __init__(self, cfg: RunConfig, run_id: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        for key, value in SYSTEM_METRICS_ENV.items():
            os.environ.setdefault(key, value)
        self.uri = cfg.tracking.resolved_uri()
        self.log_model = cfg.tracking.log_model
        self.model_name = cfg.run_name
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        system = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("false", "0")
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run_name,
                                    log_system_metrics=system)
        self.run_id = self.run.info.run_id
        if run_id is None:
            params = flatten(cfg)
            for i in range(0, len(params), 90):  # MLflow takes at most 100 params per batch
                mlflow.log_params(dict(list(params.items())[i : i + 90]))
            mlflow.log_text(to_yaml(cfg), "config/resolved.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace(":", "_"): float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_image(self, image: np.ndarray, path: str) -> None:
        mlflow.log_image(image, path)

    def log_figure(self, fig, path: str) -> None:
        """Log a matplotlib figure as a PNG artifact, then close it (pyplot keeps open figures alive)."""
        import matplotlib.pyplot as plt

        mlflow.log_figure(fig, path)
        plt.close(fig)

    def log_file(self, local: str | Path, artifact_dir: str | None = None) -> None:
        mlflow.log_artifact(str(local), artifact_dir)

    def log_policy(self, policy_dir: str | Path) -> str | None:
        """A saved policy directory per ``tracking.log_model``: nothing ("none"), the run artifact ``policy/``
        ("artifact"), or that artifact registered as a new version of the model named after the run
        ("registered", tagged on the run as ``policy_model``). Returns the artifact or ``models:/`` URI."""
        if self.log_model == "none":
            return None
        mlflow.log_artifacts(str(policy_dir), POLICY_ARTIFACT)
        source = mlflow.get_artifact_uri(POLICY_ARTIFACT)
        if self.log_model == "artifact":
            return source
        client = mlflow.tracking.MlflowClient(self.uri)
        try:
            client.create_registered_model(self.model_name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(self.model_name, source=source, run_id=self.run_id)
        uri = f"models:/{self.model_name}/{version.version}"
        mlflow.set_tag("policy_model", uri)
        return uri

    def history(self, key: str) -> list[tuple[int, float]]:
        client = mlflow.tracking.MlflowClient(self.uri)
        return sorted((m.step, m.value) for m in client.get_metric_history(self.run_id, key))

    def end(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)


def image_strip(images: list[np.ndarray], scale: int = 4) -> np.ndarray:
    """Side-by-side uint8 (H, W, 3) images, upscaled (nearest) so tiny images stay visible."""
    tiles = [np.kron(im, np.ones((scale, scale, 1), dtype=np.uint8)) for im in images]
    gap = np.full((tiles[0].shape[0], 2 * scale, 3), 255, dtype=np.uint8)
    parts = []
    for t in tiles:
        parts += [t, gap]
    return np.concatenate(parts[:-1], axis=1)


def plot_curves(series: dict[str, list[tuple[int, float]]], title: str, out_png: str | Path, smooth: int = 20):
    """A PNG line plot of metric histories; a series of >= 2 x ``smooth`` points is drawn faint with its
    trailing ``smooth``-step mean on top (per-step rewards swing with each batch's prompts). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            if smooth > 1 and len(ys) >= 2 * smooth:
                (raw,) = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
                mean = [sum(ys[max(0, i - smooth + 1): i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(ys))]
                ax.plot(xs, mean, color=raw.get_color(), label=f"{name} ({smooth}-step mean)")
            else:
                ax.plot(xs, ys, label=name, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    return fig


def plot_bars(values: dict[str, float], title: str, out_png: str | Path):
    """A PNG bar chart (accuracy per severity, ...); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.bar(list(values), list(values.values()), color="#4c72b0")
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png)
    return fig
