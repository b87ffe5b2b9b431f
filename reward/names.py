"""The names of the built-in rewards, without importing them (the run config validates
``reward.components[i].name`` against this; ``reward.registry`` checks that its built-ins agree).

A component may also name ``"package.module:function"`` (a reward function outside this package).
"""

from __future__ import annotations

import re

#: Built-in rewards: ``reward.registry`` registers all but ``gvu`` (``reward.gvu``).
KNOWN_REWARDS = ("answer", "format", "clip_similarity", "latent_quality", "answer_likelihood", "gvu")
#: Rewards of a restoration that the CLEAR rollout records (the clean image's latent, the gold answer's log-prob).
RESTORATION_REWARDS = ("latent_quality", "answer_likelihood")
#: Rewards that score with the policy itself (they need its current weights).
POLICY_REWARDS = ("gvu",)

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def unknown_reward(name: str) -> bool:
    """True when ``name`` is neither a built-in reward nor a ``module:function`` path."""
    return name not in KNOWN_REWARDS and not _IMPORT_PATH.match(name)
