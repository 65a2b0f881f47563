"""JobWatcher's newer notices: a node joined the job, a checkpoint of the job failed (once per streak),
`--notify-when` conditions; keys a successor derives alike from the record (`restore`). Pure."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain.notify.condition import parse_condition
from meshtrain.notify.events import JobWatcher, Notice


def snap(events: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"job": "j1", "state": "running", "started": 100.0, "nodes": ["a", "b"]}
    base["events"] = events or []
    base.update(fields)
    return base


def joined(t: float, node: str, member: str | None = None) -> dict[str, Any]:
    return {"t": t, "kind": "joined", "node": node, "detail": f"worker {member or node}"}


def ckpt(t: float, detail: str) -> dict[str, Any]:
    return {"t": t, "kind": "checkpoint", "node": "a", "detail": detail}


def test_node_joined_once_per_worker_and_not_for_mesh_joins() -> None:
    w = JobWatcher("j1", "mnist", "mnist.py")
    mesh_join = {
        "t": 101.0,
        "kind": "joined",
        "node": "d",
        "detail": "10.0.0.4:7946",
    }  # the mesh's, not the job's
    before = joined(50.0, "e")  # copied into the job from before it started
    events = [mesh_join, before, joined(102.0, "c")]
    (n,) = w.observe(snap(events), 103.0)
    assert (
        n.kind == "node_joined" and n.node == "c" and n.key == "node_joined:c" and n.id == "j1/node_joined:c"
    )
    assert "c joined" in n.summary and n.to_dict()["id"] == "j1/node_joined:c"
    assert w.observe(snap(events), 104.0) == []
    again = w.observe(snap([*events, joined(105.0, "c", "c~1")]), 106.0)  # the same node, a new incarnation
    assert [(x.kind, x.node, x.key) for x in again] == [("node_joined", "c", "node_joined:c~1")]


def test_checkpoint_failed_once_per_streak_of_this_run_only() -> None:
    w = JobWatcher("j1", "mnist", "mnist.py")  # checkpoints filed under the run's name: mnist
    events = [
        ckpt(101.0, "mnist@200 committed, copies on a, b"),
        ckpt(102.0, "mnist@400 aborted: a: already past that step"),  # too late: retried further ahead
        ckpt(103.0, "other@400 aborted: timed out waiting for acks"),  # another job's run
        ckpt(104.0, "resume of mnist: fetched step 200"),
        ckpt(105.0, "mnist@600 aborted: b: [Errno 28] No space left on device"),
        ckpt(106.0, "mnist@800 aborted: b: [Errno 28] No space left on device"),  # the same streak
    ]
    (n,) = w.observe(snap(events), 107.0)
    assert n.kind == "checkpoint_failed" and "mnist@600" in n.summary and "No space" in (n.detail or "")
    assert w.observe(snap(events), 108.0) == []
    events += [
        ckpt(109.0, "mnist@1000 committed, copies on a"),
        ckpt(110.0, "mnist@1200 aborted: writer b lost"),
    ]
    (m,) = w.observe(snap(events), 111.0)
    assert m.kind == "checkpoint_failed" and "1200" in m.summary and m.key != n.key
    named = JobWatcher("j2", "x", "x.py", checkpoint_run="mnist")  # --name: the run differs from the stem
    assert [x.kind for x in named.observe(snap(events[:5]), 112.0)] == ["checkpoint_failed"]


def test_conditions_fire_once_from_history() -> None:
    w = JobWatcher(
        "j1", "lm", "lm.py", conditions=[parse_condition("val_loss<1.6"), parse_condition("loss <= 2")]
    )
    assert (
        w.observe(snap(metrics={"val_loss": 1.9}, metric_history={"val_loss": [2.5, 1.9]}, loss=3.0), 1.0)
        == []
    )
    # 1.5 came and went between two snapshots: the history still has it
    s = snap(metrics={"val_loss": 1.7}, metric_history={"val_loss": [2.5, 1.9, 1.5, 1.7]}, loss=2.5)
    (n,) = w.observe(s, 2.0)
    assert n.kind == "metric" and n.metrics == {"val_loss": 1.5} and n.detail == "val_loss<1.6"
    assert n.key == "metric:val_loss<1.6" and "val_loss 1.5" in n.summary
    assert w.observe(s, 3.0) == []
    (m,) = w.observe(snap(loss=1.99, loss_history=[2.5, 1.99]), 4.0)
    assert m.key == "metric:loss<=2"


def test_a_successor_restored_from_the_record_gives_nothing_twice() -> None:
    events = [
        {"t": 101.0, "kind": "lost", "node": "a", "detail": "lost contact"},
        joined(102.0, "c"),
        ckpt(103.0, "mnist@600 aborted: timed out waiting for acks"),
    ]
    first = JobWatcher("j1", "mnist", "mnist.py", conditions=[parse_condition("step>=10")])
    given = first.observe(snap(events, state="paused", step=12), 104.0)
    assert sorted(n.kind for n in given) == [
        "checkpoint_failed",
        "metric",
        "node_joined",
        "node_lost",
        "paused",
    ]
    successor = JobWatcher("j1", "mnist", "mnist.py", conditions=[parse_condition("step>=10")])
    successor.restore(first.known, first.saved())
    assert successor.observe(snap(events, state="paused", step=13), 105.0) == []  # the same pause
    later = successor.observe(snap(events, state="running"), 106.0) + successor.observe(
        snap(events, state="paused"), 107.0
    )
    assert [n.key for n in later] == ["paused:2"]  # a second pause is news
    done = successor.ended("done", None, None, snap(events, state="done"), 108.0)
    assert done is not None and done.key == "end"
    assert successor.ended("done", None, None, None, 109.0) is None
    back = Notice.from_dict(done.to_dict())
    assert back == done


events_st = st.lists(
    st.one_of(
        st.builds(
            joined, st.floats(90, 200), st.sampled_from("abc"), st.sampled_from(["a", "b", "c", "c~1"])
        ),
        st.builds(
            lambda t, n: {"t": t, "kind": "lost", "node": n, "detail": "gone"},
            st.floats(90, 200),
            st.sampled_from("abc"),
        ),
        st.builds(
            ckpt,
            st.floats(90, 200),
            st.sampled_from(
                ["mnist@5 aborted: writer b lost", "mnist@6 committed, copies on a", "x@1 aborted: y"]
            ),
        ),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(events_st, st.integers(1, 12), st.integers(0, 12))
def test_keys_are_unique_and_a_handover_anywhere_changes_nothing(
    events: list[dict[str, Any]], grow: int, cut: int
) -> None:
    """One watcher over a growing event list, against one replaced by a successor after `cut` snapshots:
    the successor gives exactly what the first had not given yet."""
    events = sorted(events, key=lambda e: e["t"])
    snaps = [snap(events[: i * len(events) // grow]) for i in range(1, grow + 1)]
    alone = JobWatcher("j", "mnist", "m.py")
    all_keys = [n.key for s in snaps for n in alone.observe(s, 0.0)]
    assert len(all_keys) == len(set(all_keys))
    first = JobWatcher("j", "mnist", "m.py")
    keys = [n.key for s in snaps[:cut] for n in first.observe(s, 0.0)]
    second = JobWatcher("j", "mnist", "m.py")
    second.restore(first.known, first.saved())
    keys += [n.key for s in snaps[cut:] for n in second.observe(s, 0.0)]
    assert keys == all_keys
