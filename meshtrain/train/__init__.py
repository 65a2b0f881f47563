"""Elastic training building blocks: exactly-once data, state digests and transfer, generations.

    sampler.py         GlobalSampler (permutation per (seed, epoch) + global cursor), SampleLedger
    digest.py          state_digest(tree, step): blake2b of params + optimizer state
    state_transfer.py  send_state / recv_state: a full state over one TCP socket, chunked frames
    generation.py      next_roster, plan_state, gather_states: who is in g+1, who is behind, redo or not
    elastic.py         ElasticController: the step loop's decisions as a pure state machine

All but state_transfer (and gather_states, which takes a ring) are pure: no
sockets, no clock, no threads.
"""

from meshtrain.train.digest import state_digest
from meshtrain.train.elastic import ElasticController
from meshtrain.train.generation import (
    Candidate,
    MemberState,
    Roster,
    StatePlan,
    gather_states,
    next_roster,
    plan_state,
)
from meshtrain.train.sampler import GlobalSampler, LedgerViolation, SampleLedger, SamplerState, split_counts
from meshtrain.train.state_transfer import recv_state, send_state

__all__ = [
    "Candidate",
    "ElasticController",
    "GlobalSampler",
    "LedgerViolation",
    "MemberState",
    "Roster",
    "SampleLedger",
    "SamplerState",
    "StatePlan",
    "gather_states",
    "next_roster",
    "plan_state",
    "recv_state",
    "send_state",
    "split_counts",
    "state_digest",
]
