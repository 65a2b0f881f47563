"""The dashboard's pure parts: the login secret, refused-login limits, sessions, the Host check, and the
board that folds snapshots into charts, generations and output."""

from __future__ import annotations

import argparse

import pytest

from meshtrain.dashboard import listen_address
from meshtrain.dashboard.auth import (
    LoginLimiter,
    Sessions,
    csrf_ok,
    is_loopback,
    login_secret,
    loopback_host_header,
)
from meshtrain.dashboard.board import Board


def test_login_secret_is_derived_and_unrelated_to_the_key() -> None:
    key = bytes(range(32))
    secret = login_secret(key)
    assert secret == login_secret(key) and len(secret) == 32 and secret != login_secret(bytes(32))
    assert key.hex()[:32] != secret


def test_refused_logins_are_counted_and_limited() -> None:
    limiter = LoginLimiter(burst=3, retry_s=10.0)
    assert [limiter.check("1.2.3.4", "s3cret", "nope", 0.0) for _ in range(3)] == ["refused"] * 3
    assert limiter.check("1.2.3.4", "s3cret", "s3cret", 0.1) == "limited"  # even the right one, for now
    assert limiter.check("5.6.7.8", "s3cret", "s3cret", 0.1) == "ok"  # another address is not held up
    assert limiter.check("1.2.3.4", "s3cret", "s3cret", 10.5) == "ok"  # one try back after retry_s
    assert limiter.refused == 3 and limiter.rate_limited == 1


def test_sessions_expire_and_csrf_must_match() -> None:
    sessions = Sessions(ttl=100.0)
    s = sessions.create(0.0, logged_in=True)
    assert sessions.get(s.id, 50.0) is s and sessions.get("forged", 50.0) is None
    assert csrf_ok(s, s.csrf) and not csrf_ok(s, "x") and not csrf_ok(s, None) and not csrf_ok(None, s.csrf)
    assert sessions.get(s.id, 100.0) is None


def test_loopback_and_host_headers() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    assert loopback_host_header("127.0.0.1:7960") and loopback_host_header("[::1]:7960")
    assert loopback_host_header("localhost:7960")
    assert not loopback_host_header("evil.example:7960") and not loopback_host_header(None)
    assert listen_address("8080") == ("127.0.0.1", 8080) and listen_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert listen_address("[::]:8080") == ("::", 8080)
    with pytest.raises(argparse.ArgumentTypeError):
        listen_address("host:port")


def job(step: int, epoch: int = 1, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "job": "j1",
        "script": "t.py",
        "state": "running",
        "epoch": epoch,
        "epochs": 2,
        "step": step,
        "steps_per_epoch": 0,
        "loss": 1.0 / (step + 1),
        "metrics": {"val_loss": 0.5, "lr": 0.1},
        "generation": 1,
        "log": [],
    }
    base.update(fields)
    return base


def test_board_series_generations_output_and_deltas() -> None:
    board = Board()
    mesh = {"self": "a", "nodes": [{"name": "a", "state": "alive"}], "jobs": []}
    assert board.update(mesh, [job(1, log=["a1", "a2"])], 0.0)
    first, cursor = board.view()
    (j,) = first["jobs"]
    assert j["reset"] and [p["step"] for p in j["points"]] == [1] and j["log"] == ["a1", "a2"]
    assert set(j["points"][0]["m"]) == {"loss", "val_loss", "lr"} and "loss_history" not in j["snap"]
    board.update(mesh, [job(2, log=["a2", "a3"]), {"job": "j2", "state": "waiting"}], 1.0)
    board.update(mesh, [job(3, log=["a3", "a4"], generation=2)], 2.0)
    board.update(mesh, [job(1, epoch=2, log=["a4", "a5"], generation=2)], 3.0)  # epoch 2 restarts `step`
    delta, cursor = board.view(cursor)
    (j1,) = [x for x in delta["jobs"] if x["job"] == "j1"]
    assert not j1["reset"] and [p["step"] for p in j1["points"]] == [2, 3, 4]  # only new points; x grows
    assert j1["log"] == ["a3", "a4", "a5"]
    assert [g["generation"] for g in j1["generations"]] == [1, 2]
    (j2,) = [x for x in delta["jobs"] if x["job"] == "j2"]
    assert j2["stale"]  # no longer reported, never seen finishing
    quiet, _ = board.view(cursor)
    assert all(not x["points"] and not x["log"] for x in quiet["jobs"])
    version = board.version
    assert not board.update(mesh, [job(1, epoch=2, log=["a4", "a5"], generation=2)], 4.0)
    assert board.version == version  # nothing new: no push
    board.update(mesh, [job(1, epoch=2, state="done", log=[])], 5.0)
    assert board.job("j1") is not None and board.job("j1").finished  # type: ignore[union-attr]
    unreachable = board.agent_unreachable("the agent on this machine is not answering")
    assert unreachable and board.view()[0]["agent_error"]


def test_board_keeps_summaries_of_jobs_coordinated_elsewhere() -> None:
    board = Board()
    summary = {"job": "j9", "script": "x.py", "state": "running", "step": 4, "loss": 0.5, "epoch": 1}
    board.update({"nodes": [], "jobs": [summary]}, [], 0.0)
    view, _ = board.view()
    (j,) = view["jobs"]
    assert j["job"] == "j9" and not j["detailed"] and j["points"][0]["m"] == {"loss": 0.5}
    assert "jobs" not in view["mesh"]


def test_recorded_rows_fold_into_one_growing_step_axis() -> None:
    from meshtrain.dashboard.history import fold_rows

    rows = [  # two workers counting steps within each epoch; an evaluation without a step; bookkeeping
        ("m1", 0, 1.0, "loss", 2.0),
        ("m2", 0, 1.1, "loss", 4.0),
        ("m1", 1, 2.0, "loss", 1.0),
        ("m1", 1, 2.0, "samples", 16.0),
        ("m1", None, 2.5, "test_accuracy", 0.5),
        ("m1", 0, 3.0, "loss", 0.5),  # epoch 2 starts the count again
        ("m1", 1, 4.0, "loss", 0.25),
    ]
    points = fold_rows(rows)
    assert [p["step"] for p in points] == [0, 1, 2, 3]
    assert points[0] == {"step": 0, "t": 1.0, "m": {"loss": 3.0}}  # the mean over the workers
    assert points[1]["m"] == {"loss": 1.0, "test_accuracy": 0.5}  # the evaluation lands on its step
    assert [p["m"]["loss"] for p in points[2:]] == [0.5, 0.25]


def test_recorded_runs_of_a_missing_store_are_none_and_create_nothing(tmp_path: object) -> None:
    from pathlib import Path

    from meshtrain.dashboard.history import recorded_points, recorded_runs

    db = Path(str(tmp_path)) / "runs.sqlite"
    assert recorded_runs(db) == [] and recorded_points(db, "j1") is None and not db.exists()


def test_board_sends_the_checkpoint_and_run_lists_only_when_they_change() -> None:
    board = Board()
    board.update({"nodes": []}, [job(1)], 0.0)
    board.set_checkpoints([{"run": "r", "checkpoints": [{"step": 20}]}])
    board.set_runs([{"job": "j0", "state": "done"}])
    first, cursor = board.view()
    assert first["checkpoints"][0]["run"] == "r" and first["runs"][0]["job"] == "j0"
    board.update({"nodes": []}, [job(2)], 1.0)
    second, cursor = board.view(cursor)
    assert "checkpoints" not in second and "runs" not in second
    assert not board.set_runs([{"job": "j0", "state": "done"}])  # the same list: nothing to send
    board.set_runs([{"job": "j1", "state": "done"}, {"job": "j0", "state": "done"}])
    third, _ = board.view(cursor)
    assert [r["job"] for r in third["runs"]] == ["j1", "j0"] and "checkpoints" in third
