"""Pure parts of the mesh in use: placement, job progress, bundles, the metrics channel."""

from __future__ import annotations

import io
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from meshtrain.agent.bundle import Bundle, snapshot
from meshtrain.agent.jobstate import JobState
from meshtrain.agent.placement import Candidate, Request, place
from meshtrain.errors import UserError
from meshtrain.mesh import Mesh
from meshtrain.worker.reporter import Reporter


def nodes(*specs: str, proto: int = 1) -> list[Candidate]:
    """'a' alive, 'b:dead', 'c:alive:0' (protocol 0), the first is this node."""
    out = []
    for i, spec in enumerate(specs):
        name, _, rest = spec.partition(":")
        state, _, p = rest.partition(":")
        out.append(
            Candidate(name=name, state=state or "alive", protocol=int(p) if p else proto, is_self=i == 0)
        )
    return out


def test_default_takes_every_usable_node_self_first() -> None:
    d = place(nodes("m", "b", "a", "c:dead"), Request.parse(None, None), 1)
    assert (d.kind, d.nodes) == ("ready", ("m", "a", "b"))


def test_count_waits_then_says_who_is_missing() -> None:
    cands = nodes("a", "b", "c:dead")
    assert place(cands, Request.parse("3", None), 1).kind == "wait"
    d = place(cands, Request.parse("3", None), 1, timed_out=True)
    assert (
        d.kind == "error" and "only 2 of 3" in d.message and "c is dead" in d.message and d.missing == ("c",)
    )


def test_min_nodes_starts_with_fewer_once_the_wait_is_over() -> None:
    d = place(nodes("a", "b", "c:suspect"), Request.parse("3", 2), 1, timed_out=True)
    assert (d.kind, d.nodes) == ("ready", ("a", "b"))


def test_names_unknown_older_and_absent() -> None:
    cands = nodes("a", "b:alive:0", "c:dead")
    unknown = place(cands, Request.parse("a,zz", None), 1)
    assert unknown.kind == "error" and "unknown node 'zz'" in unknown.message and "a, b, c" in unknown.message
    older = place(cands, Request.parse("a,b", None), 1)
    assert older.kind == "error" and "protocol 0 (this is 1)" in older.message
    assert place(cands, Request.parse("a,c", None), 1).kind == "wait"
    assert place(cands, Request.parse("a,c", None), 1, timed_out=True).kind == "error"
    assert place(cands, Request.parse("c,a", None), 1).nodes == ()


def test_older_agents_are_never_counted() -> None:
    d = place(nodes("a", "b:alive:0"), Request.parse("2", None), 1, timed_out=True)
    assert d.kind == "error" and "b runs meshtrain protocol 0" in d.message


def test_jobstate_rates_shares_eta_and_one_based_progress() -> None:
    s = JobState(job="j1", script="x.py", started=100.0)
    s.assign(["a", "b"])
    s.set_state("running", None, 100.0)
    for i in range(11):
        t = 100.0 + i
        s.report(
            0,
            t,
            {"epoch": 0, "epochs": 2, "step": i, "steps_per_epoch": 20, "loss": 1.0 / (i + 1), "samples": 30},
        )
        s.report(1, t, {"step": i, "samples": 10, "loss": 0.5})
    snap = s.snapshot(110.0)
    assert (snap["epoch"], snap["step"], snap["size"]) == (1, 11, 2)
    assert snap["samples_per_s"] == pytest.approx(40.0)
    assert [w["share"] for w in snap["workers"]] == pytest.approx([0.75, 0.25])
    assert snap["eta_s"] == pytest.approx(29.0)  # 40 steps in all, 11 done, 1 step/s
    assert snap["loss"] == pytest.approx(1 / 11) and len(snap["loss_history"]) == 11
    s.report(0, 111.0, {"epoch": 0, "epochs": 2, "test_accuracy": 0.97})
    s.set_state("done", None, 112.0)
    done = s.snapshot(500.0)
    assert done["test_accuracy"] == 0.97 and done["elapsed_s"] == 12.0 and done["eta_s"] is None
    assert s.summary()["nodes"] == ["a", "b"]


def test_jobstate_keeps_the_last_log_lines() -> None:
    s = JobState(job="j", script="x.py", started=0.0)
    for i in range(25):
        s.add_log("a", f"line {i}")
    assert s.snapshot(1.0)["log"][-1] == "[a] line 24" and len(s.snapshot(1.0)["log"]) == 10


def test_bundle_round_trip_and_unsafe_paths(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "train.py").write_text("import helper\n")
    (src / "helper.py").write_text("X = 1\n")
    (src / "pkg" / "data.txt").write_text("d")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "junk.pyc").write_bytes(b"x")
    b = Bundle.unpack(snapshot(str(src / "train.py")).pack())
    assert set(b.files) == {"train.py", "helper.py", "pkg/data.txt"}
    script = b.extract(tmp_path / "out")
    assert script.read_text() == "import helper\n" and (tmp_path / "out" / "pkg" / "data.txt").exists()
    evil = Bundle(script="a.py", files={"a.py": b"", "../escape.py": b"x"})
    with pytest.raises(ValueError, match="unsafe"):
        evil.extract(tmp_path / "evil")
    with pytest.raises(UserError, match="no such script"):
        snapshot(str(tmp_path / "missing.py"))


def test_reporter_batches_and_never_loses_the_last_metrics() -> None:
    read_fd, write_fd = os.pipe()
    reporter = Reporter(write_fd, interval=3600.0)
    reporter.send({"k": "ready", "ring_port": 5})
    for i in range(1000):
        reporter.report({"step": i})
    reporter.close()
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 1 << 16):
        data += chunk
    os.close(read_fd)
    messages = list(msgpack.Unpacker(io.BytesIO(data), raw=False))
    assert messages[0] == {"k": "ready", "ring_port": 5}
    steps = [m["step"] for msg in messages[1:] for _, m in msg["batch"]]
    assert steps == list(range(1000)) and len(messages) <= 3  # batched, in order, all there


def test_world_size_one_mesh_covers_every_sample_once() -> None:
    mesh = Mesh()
    seen = np.concatenate(list(mesh.batches(1000, 128, epoch=3)))
    assert sorted(seen.tolist()) == list(range(1000))
    tree = {"w": np.ones(3)}
    assert mesh.allreduce(tree, weight=5) is tree


def test_worker_slices_are_disjoint_and_cover_the_global_batch() -> None:
    slices = []
    for rank in range(3):
        m = Mesh()
        m.rank, m.size = rank, 3
        slices.append(list(m.batches(100, 32, epoch=1, seed=7)))
    for step in range(len(slices[0])):
        parts = [slices[r][step] for r in range(3)]
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == len(union)
    everything = np.concatenate([p for r in range(3) for p in slices[r]])
    assert sorted(everything.tolist()) == list(range(100))


def test_the_primary_crash_wins_over_the_peer_lost_echoes_that_arrive_first() -> None:
    from meshtrain.agent.jobs import JobRequest, JobRunner, _Participant

    runner = JobRunner(request=JobRequest(script="x.py", args=[], bundle=b""), membership=None)  # type: ignore[arg-type]
    parts = [_Participant(name=n, rank=r, host="h", control_port=1) for r, n in enumerate(["a", "b", "c"])]
    runner.state.assign(["a", "b", "c"])
    logs: list[tuple[str, int, str, str]] = []
    echo = {"kind": "event", "type": "crash", "summary": "PeerLost: lost ring peer", "secondary": True}
    runner._handle(parts[0], echo, logs)
    for p in parts:  # the coordinator cancels everyone on the first failure
        p.killed = True
    runner._handle(
        parts[1],
        {
            "kind": "event",
            "type": "crash",
            "summary": "ValueError: boom",
            "traceback": "Traceback ...\nValueError: boom",
            "secondary": False,
        },
        logs,
    )
    assert runner._handle(parts[2], {"kind": "event", "type": "exit", "code": -15}, logs)  # killed by us
    verdict = runner._verdict()
    assert (verdict.state, verdict.message) == ("failed", "b (rank 1) failed: ValueError: boom")
    assert verdict.traceback is not None and verdict.traceback.endswith("ValueError: boom")
    assert verdict.exit_code == 1


def test_a_silent_non_zero_exit_and_a_lost_agent_are_failures_too() -> None:
    from meshtrain.agent.jobs import JobRequest, JobRunner, _Participant

    runner = JobRunner(request=JobRequest(script="x.py", args=[], bundle=b""), membership=None)  # type: ignore[arg-type]
    a, b = _Participant("a", 0, "h", 1), _Participant("b", 1, "h", 1)
    runner.state.assign(["a", "b"])
    runner._handle(a, {"kind": "event", "type": "exit", "code": 3, "stderr": "out of memory"}, [])
    assert runner._verdict().message == "a (rank 0) exited with code 3: out of memory"
    other = JobRunner(request=JobRequest(script="x.py", args=[], bundle=b""), membership=None)  # type: ignore[arg-type]
    assert other._handle(b, None, [])
    lost = "every worker was lost; the last, b (rank 1): lost contact with its agent"
    assert other._verdict().message == lost
    done = JobRunner(request=JobRequest(script="x.py", args=[], bundle=b""), membership=None)  # type: ignore[arg-type]
    assert done._handle(a, {"kind": "event", "type": "exit", "code": 0}, [])
    assert done._verdict().state == "done" and done._verdict().exit_code == 0


def test_a_rejoined_worker_shows_its_rank_in_the_ring_not_its_slot() -> None:
    """Issue 16 #13: a worker re-admitted after a loss showed rank 3 in a 3-worker job."""
    state = JobState(job="j", script="s.py", started=0.0)
    state.assign(["a", "b", "c"])
    state.remove_worker(2)  # c's worker was lost...
    state.add_worker(3, "c~1")  # ...and its node re-admitted as a new slot
    ranks = {w["node"]: (w["rank"], w["slot"]) for w in state.snapshot(2.0)["workers"]}
    assert ranks == {"a": (0, 0), "b": (1, 1), "c~1": (2, 3)}


def test_an_evaluation_keeps_its_own_epoch_when_the_job_has_moved_on() -> None:
    """Issue 16 #13: the plain log labelled epoch 4's evaluation "(epoch 5/5)"."""
    from meshtrain.ui.plain import JobLog

    state = JobState(job="j", script="s.py", started=0.0)
    state.assign(["a"])
    step = {"epochs": 5, "steps_per_epoch": 10, "loss": 0.5, "samples": 4}
    state.report(0, 1.0, {"epoch": 3, "step": 9, **step})
    state.report(0, 1.1, {"epoch": 3, "epochs": 5, "test_accuracy": 0.9})  # epoch 4's evaluation...
    state.report(0, 1.2, {"epoch": 4, "step": 0, **step})
    snap = state.snapshot(1.3)  # ...read after epoch 5 began
    assert snap["evaluated_epoch"] == 4
    lines = [ln for ln in JobLog().feed({**snap, "state": "running"}) if ln.startswith("evaluated")]
    assert lines and lines[0].startswith("evaluated (epoch 4/5)"), lines


def test_two_evaluations_between_two_snapshots_are_two_lines() -> None:
    from meshtrain.ui.plain import JobLog

    state = JobState(job="j", script="s.py", started=0.0)
    state.assign(["a"])
    log = JobLog()
    log.feed({**state.snapshot(0.5), "state": "running"})
    state.report(0, 1.0, {"epoch": 0, "epochs": 1, "val_loss": 2.0})
    state.report(0, 1.1, {"epoch": 0, "epochs": 1, "val_loss": 1.5})  # before the view polls again
    lines = [ln for ln in log.feed({**state.snapshot(1.2), "state": "running"}) if ln.startswith("evaluated")]
    assert [("val_loss 2" in ln, "val_loss 1.5" in ln) for ln in lines] == [(True, False), (False, True)], (
        lines
    )
