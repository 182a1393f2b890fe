"""The roles of the refine loop: the policy, the GenPRM critic and the refiner; steps and answers."""

from critloop.agent.critic import (
    ChainCritique,
    CodeRun,
    CriticConfig,
    CritiqueReport,
    CritiqueRun,
    CritiqueTier,
    GenPRMCritic,
    ScanMode,
    StepReport,
)
from critloop.agent.critic_protocol import CriticProfile
from critloop.agent.verdict import RewardSource, Verdict

__all__ = [
    "ChainCritique",
    "CodeRun",
    "CriticConfig",
    "CriticProfile",
    "CritiqueReport",
    "CritiqueRun",
    "CritiqueTier",
    "GenPRMCritic",
    "RewardSource",
    "ScanMode",
    "StepReport",
    "Verdict",
]
