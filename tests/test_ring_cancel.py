"""A newer membership view cancels a ring connect at once (issue 16 #15).

Losing two nodes made the coordinator send two views: the first still held
the second lost member, and the workers' connect for it waited out the full
30 s connect timeout for a member that was gone before they took the second.
Now the views thread cancels the attempt the moment a newer view arrives.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from typing import Any

import pytest

from meshtrain.errors import PeerLost
from meshtrain.ring import Ring, RingListener
from meshtrain.ring.tcp import ConnectCancelled
from meshtrain.worker.mesh import CONNECT_TIMEOUT_S, WorkerMesh
from meshtrain.worker.reporter import Reporter
from meshtrain.worker.views import ViewBoard


def test_a_cancelled_connect_gives_up_at_once() -> None:
    with RingListener.bind("127.0.0.1") as listener:
        gone = socket.socket()
        gone.bind(("127.0.0.1", 0))
        gone.listen(8)  # accepts TCP, never answers a hello: a frozen or lost member
        addrs = [("127.0.0.1", listener.port), gone.getsockname()]
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        start = time.monotonic()
        with pytest.raises(ConnectCancelled) as info:
            Ring.connect(listener, 0, addrs, job="j", generation=5, timeout=30, cancel=cancel)
        assert time.monotonic() - start < 1.0
        assert isinstance(info.value, PeerLost) and info.value.generation == 5
        gone.close()


def _view(version: int, members: list[tuple[str, int]]) -> str:
    return json.dumps({"view": {"version": version, "members": [[m, "127.0.0.1", p] for m, p in members]}})


@pytest.mark.timeout(120)
def test_a_newer_view_ends_the_connect_for_a_view_with_a_lost_member() -> None:
    names = ["a", "b", "c"]
    listeners = [RingListener.bind("127.0.0.1") for _ in names]
    boards = [ViewBoard(io.StringIO("")) for _ in names]
    meshes = [
        WorkerMesh(member=m, job="jc", node=m, listener=lst, views=board, reporter=Reporter(None))
        for m, lst, board in zip(names, listeners, boards, strict=True)
    ]
    lost = socket.socket()
    lost.bind(("127.0.0.1", 0))
    lost.listen(8)  # the second lost member: its port still takes TCP connections, nothing answers
    members = [(m, lst.port) for m, lst in zip(names, listeners, strict=True)]
    for board in boards:
        board.feed(_view(1, [*members, ("d", lost.getsockname()[1])]))
    done: dict[str, Any] = {}

    def connect(mesh: WorkerMesh) -> None:
        try:
            mesh.connect(10)
            done[mesh.member] = (time.monotonic(), mesh._gen, mesh.size)
        except BaseException as exc:  # noqa: B036 - handed back to the test
            done[mesh.member] = exc

    threads = [threading.Thread(target=connect, args=(m,), daemon=True) for m in meshes]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every worker is now blocked connecting view 1
    assert not done, done
    sent = time.monotonic()
    for board in boards:
        board.feed(_view(2, members))  # the coordinator noticed the second loss
    for t in threads:
        t.join(CONNECT_TIMEOUT_S + 15)
    try:
        for name in names:
            at, gen, size = done[name]
            assert gen == 2 and size == 3, done
            assert at - sent < 5.0, f"{name} formed generation 2 {at - sent:.1f}s after it arrived"
    finally:
        for mesh in meshes:
            mesh.close()
        for lst in listeners:
            lst.close()
        lost.close()
