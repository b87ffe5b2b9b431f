"""What the service tests share: tiny run configs on temporary files, MLflow metric histories, and a
Ray cluster that is shut down after each test."""

from __future__ import annotations

import mlflow
import pytest
import ray

from services.config import RunConfig, load_config

# The tiny VAE fit of a service test: 2 steps on 64 images (tests/test_restoration.py checks a real fit).
FAST_VAE_FIT = ["vae_fit.images=64", "vae_fit.eval_images=8", "vae_fit.epochs=1"]

# Tiny sizes for a recipe config's 2-step service run (GvU / UAE / Janus GvU tests).
RECIPE_TINY = [*FAST_VAE_FIT, "task.train_size=32", "task.eval_size=4", "rollout.prompts_per_step=2", "rollout.group_size=2",
               "rollout.max_new_tokens=6", "rollout.num_workers=1", "tracking.log_images_every=1",
               "algorithm.steps=2", "checkpoint.every=2", "sft.steps=2", "sft.batch_size=4", "reward.num_cpus=0.5"]


def run_config(tmp_path, name: str, tiny: list[str], *extra: str, config: str | None = None) -> RunConfig:
    """A run named ``name`` whose checkpoints and MLflow SQLite file live under ``tmp_path``."""
    return load_config(config, [*tiny, f"run_name={name}", f"checkpoint.dir={tmp_path}/ckpt",
                                f"tracking.uri=sqlite:///{tmp_path}/{name}.db", *extra])


def metric(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of one run, by step."""
    c = mlflow.tracking.MlflowClient(uri)
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


@pytest.fixture
def ray_down():
    """Shut the local Ray cluster a test started down after it."""
    yield
    if ray.is_initialized():
        ray.shutdown()


def record_syncs(monkeypatch, holders) -> list[tuple[int, list[int], bool, dict[str, float]]]:
    """Wrap ``Run.publish_and_sync``: after every sync, append (learner version, each holder's version,
    whether every holder's weights digest equals the learner's, the learner's digest). ``holders(run)``
    lists the actors that must follow the learner (the reward actor, rollout workers)."""
    from services import driver

    seen: list = []
    publish_and_sync = driver.Run.publish_and_sync

    def spy(self, bump: bool = True):
        dt = publish_and_sync(self, bump)
        learner = self.learner.call("weights_digest")
        actors = holders(self)
        digests = ray.get([a.weights_digest.remote() for a in actors])
        same = all(d.keys() == learner.keys() and all(abs(d[k] - learner[k]) <= 1e-6 * (1 + abs(learner[k]))
                                                      for k in learner) for d in digests)
        seen.append((self.version, ray.get([a.version.remote() for a in actors]), same, learner))
        return dt

    monkeypatch.setattr(driver.Run, "publish_and_sync", spy)
    return seen
