"""The mesh's one leader and what it leads: checkpoint rounds.

election.py: who leads (sticky, term-numbered, from the gossip view).
checkpoint.py: the two-phase checkpoint protocol (leader's coordinator, workers' participant).
Both are pure state machines; the agent and worker shells carry out their actions.
"""

from meshtrain.leader.checkpoint import CheckpointCoordinator, CheckpointParticipant, CheckpointPolicy
from meshtrain.leader.election import (
    FOLLOW_META_KEY,
    LEADER_META_KEY,
    Claim,
    Election,
    Follow,
    LeaderChanged,
    Leadership,
    Resign,
)

__all__ = [
    "FOLLOW_META_KEY",
    "LEADER_META_KEY",
    "CheckpointCoordinator",
    "CheckpointParticipant",
    "CheckpointPolicy",
    "Claim",
    "Election",
    "Follow",
    "LeaderChanged",
    "Leadership",
    "Resign",
]
