"""The two-phase checkpoint protocol: the pure coordinator and participants driven over a message
queue (msgpack round-trips, reorderable), carrying out their actions on real on-disk stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.errors import UserError
from meshtrain.leader.checkpoint import (
    Abort,
    Aborted,
    CheckpointCoordinator,
    CheckpointParticipant,
    CheckpointPolicy,
    Commit,
    CommitPart,
    Committed,
    Discard,
    Failed,
    Message,
    Prepare,
    Replicate,
    Send,
    WritePart,
    Written,
    message_from_wire,
    to_wire,
)

RUN = "job"


class World:
    """Nodes with a participant and a store each; at most one live coordinator; a queue of messages."""

    def __init__(
        self, root: Path, nodes: tuple[str, ...] = ("a", "b", "c"), *, replicas: int = 2, every: str = "10"
    ) -> None:
        self.nodes = nodes
        self.stores = {n: CheckpointStore(root / n) for n in nodes}
        self.parts = {n: CheckpointParticipant(n, RUN) for n in nodes}
        self.policy = CheckpointPolicy.parse(every)
        self.replicas = replicas
        self.queue: list[tuple[str, dict[str, Any]]] = []
        self.coordinator: CheckpointCoordinator | None = None
        self.committed: list[int] = []
        self.aborted: list[tuple[int, str]] = []
        self.replicated: list[Replicate] = []
        self.now = 0.0
        self.step = 0

    # the leader

    def elect(self, leader: str, term: int) -> None:
        if self.coordinator is not None:
            self.apply(self.coordinator.leader, self.coordinator.stop("deposed"))
        self.coordinator = CheckpointCoordinator(
            RUN,
            term,
            leader,
            self.policy,
            now=self.now,
            replicas=self.replicas,
            ack_timeout=30.0,
            last_step=self.step,
        )
        self.apply(leader, self.coordinator.start(self.nodes))

    def crash_leader(self) -> None:
        self.coordinator = (
            None  # its process is gone: no more actions, its queue entries are delivered anyway
        )

    # training and the network

    def train_to(self, step: int) -> None:
        while self.step < step:
            self.step += 1
            self.now += 1.0
            for n in self.nodes:
                self.apply(n, self.parts[n].step_done(self.step))
            if self.coordinator is not None:
                self.apply(
                    self.coordinator.leader, self.coordinator.progress(self.now, self.step, self.nodes)
                )
                self.apply(self.coordinator.leader, self.coordinator.poll(self.now))

    def deliver(self, k: int = 0) -> None:
        to, data = self.queue.pop(k)
        message = message_from_wire(msgpack.unpackb(msgpack.packb(data)))
        if isinstance(message, (Written, Failed)):
            if self.coordinator is not None and self.coordinator.leader == to:
                self.apply(
                    to, self.coordinator.on_message(self.now, message, mesh=self.nodes, wall=1e9 + self.now)
                )
        else:
            self.apply(to, self.parts[to].on_message(message))

    def flush(self) -> None:
        while self.queue:
            self.deliver()

    def apply(self, node: str, actions: list[Any]) -> None:
        store = self.stores[node]
        for a in actions:
            if isinstance(a, Send):
                self.queue.extend((to, to_wire(a.message)) for to in a.to)
            elif isinstance(a, WritePart):
                record = store.write_part(RUN, a.step, {"w": mx.full((16,), float(a.step))}, cursor=a.step)
                self.apply(node, self.parts[node].part_written(a.term, a.step, record["bytes"]))
            elif isinstance(a, CommitPart):
                store.commit(RUN, a.step, a.manifest)
            elif isinstance(a, Discard):
                store.discard(RUN, a.step)
            elif isinstance(a, Committed):
                self.committed.append(a.step)
            elif isinstance(a, Aborted):
                self.aborted.append((a.step, a.reason))
            elif isinstance(a, Replicate):
                self.replicated.append(a)

    # what is on disk

    def complete(self, node: str) -> list[int]:
        return [i.step for i in self.stores[node].checkpoints(RUN)]

    def leftovers(self) -> list[str]:
        """Uncommitted step directories on any node."""
        out = []
        for n, s in self.stores.items():
            run_dir = s.root / RUN
            if run_dir.is_dir():
                done = {str(x) for x in self.complete(n)}
                out += [f"{n}/{p.name}" for p in run_dir.iterdir() if p.name not in done]
        return out


# ------------------------------------------------------------------ policy and messages


def test_policy_parse_and_due() -> None:
    assert CheckpointPolicy.parse("500") == CheckpointPolicy(every_steps=500)
    assert CheckpointPolicy.parse("90s").every_seconds == 90
    assert CheckpointPolicy.parse("5m").every_seconds == 300
    assert CheckpointPolicy.parse("1.5h").every_seconds == 5400
    for bad in ("", "0", "-3", "2.5", "10 parsecs", "m"):
        with pytest.raises(UserError, match="checkpoint-every"):
            CheckpointPolicy.parse(bad)
    steps, secs = CheckpointPolicy.parse("100"), CheckpointPolicy.parse("60s")
    assert not steps.due(199, 1e9, 100, 0) and steps.due(200, 0, 100, 0)
    assert not secs.due(10**6, 59.9, 0, 0) and secs.due(1, 60.0, 0, 0)


def test_messages_survive_msgpack() -> None:
    messages: list[Message] = [
        Prepare(RUN, 3, "a", 40, ("a", "b")),
        Written(RUN, 3, 40, "b", 1234),
        Failed(RUN, 3, 40, "b", "disk full"),
        Commit(RUN, 3, 40, {"replicas": ["a", "b"]}),
        Abort(RUN, 4, None, "new leader"),
    ]
    for m in messages:
        assert message_from_wire(msgpack.unpackb(msgpack.packb(to_wire(m)))) == m
    with pytest.raises(ValueError):
        message_from_wire({"type": "gossip"})


# ------------------------------------------------------------------ rounds


def test_round_commits_on_the_chosen_writers(tmp_path: Path) -> None:
    w = World(tmp_path, ("a", "b", "c", "d"), replicas=1)
    w.elect("a", 1)
    w.flush()
    w.train_to(9)  # the Prepare aims one step ahead; step 10 is due, so it names exactly 10
    assert [m["type"] for _, m in w.queue] == ["prepare", "prepare"]  # replicas=1: two writers, a and b
    assert {m["step"] for _, m in w.queue} == {10}
    w.flush()
    w.train_to(10)
    assert w.leftovers() == ["a/10", "b/10"] and w.committed == []  # parts written, nothing counts yet
    w.flush()  # acks -> commit -> manifests
    assert w.committed == [10] and w.complete("a") == [10] and w.complete("b") == [10]
    assert w.complete("c") == [] and w.leftovers() == []
    manifest = w.stores["a"].manifest(RUN, 10)
    assert manifest["writers"] == ["a", "b"] and manifest["term"] == 1 and manifest["leader"] == "a"
    assert manifest["time"] == 1e9 + 10 and manifest["files"]["params.safetensors"]["bytes"] > 0
    assert w.replicated == []  # two copies were enough


def test_replicas_go_to_idle_mesh_members(tmp_path: Path) -> None:
    c = CheckpointCoordinator(RUN, 1, "a", CheckpointPolicy(every_steps=1), now=0.0, replicas=2)
    (send,) = c.progress(1.0, 1, ["a"])
    assert isinstance(send, Send) and send.to == ("a",)
    actions = c.on_message(2.0, Written(RUN, 1, 2, "a"), mesh=["a", "x", "y", "z"], wall=123.0)
    assert [type(a) for a in actions] == [Send, Committed, Replicate, Replicate]
    assert [(r.source, r.target) for r in actions if isinstance(r, Replicate)] == [("a", "x"), ("a", "y")]
    committed = actions[1]
    assert isinstance(committed, Committed) and committed.manifest["replicas"] == ["a", "x", "y"]
    assert committed.manifest["time"] == 123.0


def test_leader_killed_between_acks_and_manifest(tmp_path: Path) -> None:
    """All parts written and acked, the leader dies before committing: no manifest anywhere, nothing
    listed; the next leader's first message removes the parts and its own checkpoint completes."""
    w = World(tmp_path)
    w.elect("a", 1)
    w.flush()
    w.train_to(9)
    w.flush()  # Prepare(10) delivered
    w.train_to(10)
    w.flush()
    assert w.committed == [10]
    w.train_to(19)
    w.flush()  # Prepare(20) delivered: 10 steps after the last commit
    w.train_to(20)  # every writer wrote its part and queued a Written for "a"
    acks = [m for _, m in w.queue if m["type"] == "written"]
    assert len(acks) == 3
    w.crash_leader()
    w.flush()  # the acks reach nobody
    assert all(w.complete(n) == [10] for n in w.nodes)
    assert sorted(w.leftovers()) == ["a/20", "b/20", "c/20"]
    w.elect("b", 2)  # the election's next leader, term 2
    w.flush()
    assert w.leftovers() == [] and all(w.complete(n) == [10] for n in w.nodes)
    w.train_to(29)
    w.flush()
    w.train_to(30)
    w.flush()
    assert w.committed == [10, 30] and all(w.complete(n) == [10, 30] for n in w.nodes)
    assert w.stores["c"].manifest(RUN, 30)["term"] == 2


def test_stale_commit_from_a_dead_leaders_term_is_ignored(tmp_path: Path) -> None:
    p = CheckpointParticipant("b", RUN, step=5)
    assert p.on_message(Prepare(RUN, 1, "a", 6, ("a", "b"))) == []
    assert p.step_done(6) == [WritePart(RUN, 1, 6)]
    assert p.part_written(1, 6, 10) == [Send(("a",), Written(RUN, 1, 6, "b", 10))]
    assert p.leader_changed(2) == [Discard(RUN, 6)]  # the election moved on before the commit came
    assert p.on_message(Commit(RUN, 1, 6, {})) == []  # too late: never a manifest for a discarded part
    assert p.on_message(Prepare(RUN, 1, "a", 9, ("b",))) == []  # old term: ignored


def test_a_new_leaders_abort_spares_its_own_rounds() -> None:
    """Its Prepare may overtake its opening Abort(None): the Abort must not kill the new round."""
    p = CheckpointParticipant("c", RUN, step=11)
    p.on_message(Prepare(RUN, 1, "a", 12, ("c",)))
    assert p.on_message(Prepare(RUN, 2, "b", 13, ("c",))) == [Discard(RUN, 12)]
    assert p.on_message(Abort(RUN, 2, None, "new leader")) == []
    assert p.step_done(12) == [] and p.step_done(13) == [WritePart(RUN, 2, 13)]


def test_abort_while_writing_discards_when_the_write_finishes() -> None:
    p = CheckpointParticipant("b", RUN)
    p.on_message(Prepare(RUN, 1, "a", 3, ("b",)))
    assert p.step_done(3) == [WritePart(RUN, 1, 3)]
    assert p.on_message(Abort(RUN, 1, 3, "timeout")) == [Discard(RUN, 3)]
    assert p.part_written(1, 3) == [Discard(RUN, 3)]


def test_a_writer_past_the_step_fails_the_round(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.elect("a", 1)
    w.flush()
    w.train_to(10)  # Prepare(11) queued
    w.train_to(13)  # ... but the workers ran on before it arrived
    w.flush()
    assert w.committed == [] and w.aborted and "already past" in w.aborted[0][1]
    assert w.coordinator is not None and w.coordinator.lead_steps == 2  # it aims further ahead next time
    w.train_to(14)  # due again (nothing committed yet): Prepare(14 + 2)
    w.flush()
    w.train_to(16)
    w.flush()
    assert w.committed == [16] and w.leftovers() == []


def test_timeout_and_lost_writer_abort_and_clean_up(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.elect("a", 1)
    w.flush()
    w.train_to(9)
    w.flush()
    w.train_to(10)
    w.queue = [q for q in w.queue if q[1]["node"] != "c"]  # c's ack is lost
    w.flush()
    assert w.committed == [] and sorted(w.leftovers()) == ["a/10", "b/10", "c/10"]
    w.now += 31.0
    w.apply("a", w.coordinator.poll(w.now))  # type: ignore[union-attr]
    w.flush()
    assert w.aborted == [(10, "timed out waiting for acks")] and w.leftovers() == []
    c = CheckpointCoordinator(RUN, 1, "a", CheckpointPolicy(every_steps=1), now=0.0)
    c.progress(1.0, 1, ["a", "b"])
    assert c.member_lost(2.0, "zz") == []
    lost = c.member_lost(2.0, "b")
    assert Aborted(RUN, 2, "writer b lost") in lost and c.round is None
    assert c.next_deadline() == float("inf")


# ------------------------------------------------------------------ any interleaving


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    order=st.lists(st.integers(0, 50), min_size=40, max_size=40),
    crash_at=st.integers(0, 39),
    lose_writer=st.booleans(),
)
def test_any_interleaving_never_leaves_a_torn_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, order: list[int], crash_at: int, lose_writer: bool
) -> None:
    """Messages delivered in any order, the leader crashing at any point: every manifest on disk
    belongs to a round its leader committed, and after the next leader's round nothing is left over."""
    w = World(tmp_path_factory.mktemp("w"), every="3")
    w.elect("a", 1)
    for k, pick in enumerate(order):
        if k == crash_at:
            w.crash_leader()
            w.elect("b", 2)
        if w.queue and pick % 3:
            w.deliver(pick % len(w.queue))
        else:
            w.train_to(w.step + 1)
        if lose_writer and k == 20 and w.coordinator is not None:
            w.apply(w.coordinator.leader, w.coordinator.member_lost(w.now, "c"))
        for n in w.nodes:  # invariant at every point
            assert set(w.complete(n)) <= set(w.committed)
    w.flush()
    before = len(w.committed)
    for _ in range(200):  # then a calm network: the live leader's next round completes (or times out first)
        w.train_to(w.step + 1)
        w.flush()
        if len(w.committed) > before:
            break
    assert w.leftovers() == []
    assert len(w.committed) > before and all(w.committed[-1] in w.complete(n) for n in w.nodes)
    for n in w.nodes:
        for step in w.complete(n):
            assert w.stores[n].load(RUN, step, verify=True).state["cursor"] == step


def test_a_prepare_goes_out_one_report_early_for_the_exact_multiple() -> None:
    c = CheckpointCoordinator(RUN, 1, "a", CheckpointPolicy(every_steps=20), now=0.0, lead_steps=2)
    assert c.progress(1.0, 9, ["a"]) == []  # 9 + 2 is not due, and nothing says reports are sparse
    c.horizon_steps = 10  # the shell saw the job make 10 steps between reports: 19 would be too late
    (send,) = c.progress(1.5, 9, ["a"])
    assert isinstance(send, Send) and isinstance(send.message, Prepare) and send.message.step == 20
