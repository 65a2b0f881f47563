"""Who coordinates a job, on four hosts in network namespaces (issue 17): hand-overs, a return, two jobs.

- The coordinator killed twice in one job (host 0, then its successor host 1): two hand-overs, and the
  job finishes on hosts 2 and 3, every sample of every epoch exactly once.
- Host 0 cut off mid-job, then healed: it adopts the record the others made progress with (a formed
  view newer than its own), its stale runner steps down and its stale worker ends, so it neither
  takes the job back nor trains a second copy; its `run` client sees the job's end.
- Two jobs at once, with different coordinators on shared nodes: the node that coordinates one and
  works for the other is killed; each job hands over or goes on alone, and both finish exactly once.

Needs root and iproute2 (skips otherwise).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshtrain import netns
from tests.jobs_netns import Hosts, hosts, wait
from tests.test_elastic_agents import check_ledger, finished_digests

pytestmark = [
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
    pytest.mark.timeout(240),
]


def coordinator(mesh: Hosts, i: int, job: str) -> str | None:
    return mesh.job(i, job).get("coordinator")


def done_on(mesh: Hosts, i: int, job: str) -> None:
    wait(
        lambda: mesh.job(i, job).get("state") == "done",
        90,
        lambda: str(mesh.job(i, job)) + mesh.log(i)[-3000:],
    )
    row = mesh.job(i, job)
    assert row["exit_code"] == 0, row


def test_the_coordinator_killed_twice_in_one_job(tmp_path: Path) -> None:
    epochs = 6
    with hosts(tmp_path, prefix="jc") as mesh:
        client = mesh.run_job(0, epochs=epochs, sleep=0.1)
        wait(lambda: mesh.running(2), 90, lambda: mesh.log(0)[-3000:])
        job = mesh.running(2)[0]
        wait(lambda: mesh.steps("host1") >= 4, 90, "host1 trains")
        assert coordinator(mesh, 2, job) == "host0"
        mesh.kill(0, client)  # the coordinator (and submitter): host 1 takes over
        wait(lambda: coordinator(mesh, 2, job) == "host1", 30, lambda: str(mesh.job(2, job)))
        at = mesh.steps("host1")
        wait(lambda: mesh.steps("host2") >= at + 3, 60, "training goes on under host1")
        mesh.kill(1)  # the coordinator again: host 2 takes over
        wait(lambda: coordinator(mesh, 3, job) == "host2", 30, lambda: str(mesh.job(3, job)))
        done_on(mesh, 3, job)
        assert mesh.steps("host1") < epochs * 12, "host1 was killed after the job ended"
        digests = finished_digests(mesh.out)
        assert set(digests) == {"host2", "host3"} and len(set(digests.values())) == 1, digests
        check_ledger(mesh.ledger, epochs)


def test_host0_healed_after_its_loss_neither_takes_the_job_back_nor_runs_a_second_copy(
    tmp_path: Path,
) -> None:
    epochs = 6
    with hosts(tmp_path, prefix="jd") as mesh:
        client = mesh.run_job(0, epochs=epochs, sleep=0.1)
        wait(lambda: mesh.running(1), 90, lambda: mesh.log(0)[-3000:])
        job = mesh.running(1)[0]
        wait(lambda: mesh.steps("host1") >= 4, 90, "host1 trains")
        mesh.cluster.cut(0)
        wait(lambda: coordinator(mesh, 1, job) == "host1", 30, lambda: str(mesh.job(1, job)))
        at = mesh.steps("host1")
        wait(lambda: mesh.steps("host1") >= at + 3, 60, "training goes on without host 0")
        alone = mesh.steps("host0")
        mesh.cluster.heal(0)
        wait(
            lambda: mesh.job(0, job).get("coordinator") not in (None, "host0"),
            30,
            lambda: str(mesh.job(0, job)),
        )
        done_on(mesh, 1, job)
        _, err = client.communicate(timeout=60)  # the healed submitter's `run` follows the job to its end
        assert client.returncode == 0, err[-2000:]
        assert mesh.job(0, job)["state"] == "done"
        assert [r["job"] for r in mesh.jobs(0)] == [job]  # one job, no second copy
        assert mesh.steps("host0") == alone  # its stale worker never trained again
        digests = finished_digests(mesh.out)
        assert "host0" not in digests and {"host1", "host2", "host3"} <= set(digests), digests
        assert len(set(digests.values())) == 1, digests
        check_ledger(mesh.ledger, epochs)


def test_two_jobs_at_once_with_their_own_coordinators(tmp_path: Path) -> None:
    epochs = 10  # 120 steps: the kill below lands mid-job
    with hosts(tmp_path, prefix="je") as mesh:
        la, lb, oa, ob = (tmp_path / d for d in ("la", "lb", "oa", "ob"))
        for d in (la, lb, oa, ob):
            d.mkdir()
        script = ["--epochs", str(epochs), "--step-sleep", "0.1"]
        from tests.jobs_netns import SCRIPT

        a = mesh.spawn(
            0,
            "run",
            "--nodes",
            "host0,host1,host2",
            "--ledger",
            str(la),
            str(SCRIPT),
            "--out",
            str(oa),
            *script,
        )
        b = mesh.spawn(
            3,
            "run",
            "--nodes",
            "host1,host2,host3",
            "--ledger",
            str(lb),
            str(SCRIPT),
            "--out",
            str(ob),
            *script,
        )
        wait(lambda: len(mesh.running(2)) == 2, 90, lambda: mesh.log(0)[-2000:] + mesh.log(3)[-2000:])
        rows = {r["job"]: r for r in mesh.jobs(2)}
        ja = next(j for j, r in rows.items() if set(r["nodes"]) == {"host0", "host1", "host2"})
        jb = next(j for j, r in rows.items() if set(r["nodes"]) == {"host1", "host2", "host3"})
        wait(lambda: all(len(list(d.glob("*.jsonl"))) == 3 for d in (la, lb)), 90, "both jobs train")
        assert coordinator(mesh, 2, ja) == "host0" and coordinator(mesh, 2, jb) == "host1"
        mesh.kill(1)
        for d in (la, lb):  # mid-job: far from the last step
            assert (
                len((d / "ledger-host2.jsonl").read_text().splitlines()) < epochs * 12 // 2
            )  # job b's coordinator, and a worker of job a
        wait(lambda: coordinator(mesh, 2, jb) == "host2", 30, lambda: str(mesh.job(2, jb)))
        assert coordinator(mesh, 2, ja) == "host0"
        for proc in (a, b):
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
        for job in (ja, jb):
            assert mesh.job(2, job)["state"] == "done"
        da, db = finished_digests(oa), finished_digests(ob)
        assert set(da) == {"host0", "host2"} and len(set(da.values())) == 1, da
        assert set(db) == {"host2", "host3"} and len(set(db.values())) == 1, db
        check_ledger(la, epochs)
        check_ledger(lb, epochs)
