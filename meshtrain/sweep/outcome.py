"""What a trial's end means for the sweep (pure): complete, pruned, failed, or retried elsewhere.

Why the line is drawn where it is:

- a job whose every worker was *lost* (its node left the mesh, its worker was
  killed by a signal: the coordinator's ``every worker was lost`` verdict,
  meshtrain.agent.jobs) says nothing about the trial's values, so the trial
  runs again on another node, from its newest checkpoint when it has one, at
  most ``MAX_RETRIES`` times (a node that keeps dying under every trial would
  otherwise hold the sweep for ever);
- a job the *script* ended (an exception, a non-zero exit) would end the same
  way anywhere: the trial failed (Optuna's FAIL), and running it again would
  only burn the mesh;
- a trial that ran to the end without ever reporting the objective failed too
  (the sweep's first such trial stops the sweep, driver.py).

``recorded`` reads the same verdicts back from a run record (``sweep --resume``,
resume.py): what ended for a reason of the trial's own is kept, anything cut
short from outside (the sweep stopped, its submitter went away, its node was
lost, still running) is run again.
"""

from __future__ import annotations

from typing import Literal

MAX_RETRIES = 2
LOST = "every worker was lost"  # the coordinator's verdict when no worker of the job is left
PRUNED_REASON = "pruned by the sweep"
STOPPED_REASON = "the sweep stopped"

Decision = Literal["complete", "pruned", "fail", "unreported", "retry"]
Recorded = Literal["complete", "pruned", "fail", "unfinished"]


def node_lost(state: str, message: str | None) -> bool:
    """The job failed because its nodes were lost, not because of anything the script did."""
    return state == "failed" and (message or "").startswith(LOST)


def decide(
    state: str,
    message: str | None,
    *,
    pruned: bool,
    value: float | None,
    retries: int,
    max_retries: int = MAX_RETRIES,
) -> Decision:
    """A finished attempt of a trial -> what the sweep does with it.

    `state`/`message` are the job's (done | failed | cancelled), `pruned` whether the sweep cancelled it
    for the pruner, `value` the objective's last reported value (None: never reported), `retries` how many
    times this trial was already run again.
    """
    if pruned:
        return "pruned"
    if state == "done":
        return "complete" if value is not None else "unreported"
    if node_lost(state, message):
        return "retry" if retries < max_retries else "fail"
    return "fail"


def recorded(state: str, reason: str | None, value: float | None) -> Recorded:
    """A trial's newest recorded run -> how a resumed sweep takes it (see the module docstring)."""
    if state == "done":
        return "complete" if value is not None else "fail"
    if state == "cancelled" and reason == PRUNED_REASON:
        return "pruned"
    if state == "failed" and not node_lost(state, reason):
        return "fail"
    return "unfinished"
