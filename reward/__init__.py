"""Rewards: answer correctness, format, image reconstruction similarity (UAE), and the reward actor.

Light imports only here; ``reward.clip_similarity`` (transformers) and ``reward.actor`` (Ray at
actor-creation time) are imported on use.
"""

from reward.answer import answer_reward, extract_answer
from reward.format import format_reward
from reward.registry import (
    REWARDS,
    RewardContext,
    RewardSet,
    RewardSpec,
    RewardStats,
    combine,
    count_nan,
    get_reward,
    register_reward,
)

__all__ = [
    "REWARDS",
    "RewardContext",
    "RewardSet",
    "RewardSpec",
    "RewardStats",
    "answer_reward",
    "combine",
    "count_nan",
    "extract_answer",
    "format_reward",
    "get_reward",
    "register_reward",
]
