"""Example snapshots, shaped like the agent's, for the preview and the view tests.

They show the interesting cases at once: a leader, a suspect and a dead node,
a battery, a running job, a job waiting for nodes and a failed job.
"""

from __future__ import annotations

from typing import Any

T0 = 1_764_032_400.0  # a fixed instant so previews and tests are reproducible


def mesh() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "self": "n-mac2",
        "leader": "n-mac1",
        "nodes": [
            {
                "id": "n-mac1",
                "name": "mac1",
                "addr": "10.77.0.1:7946",
                "state": "alive",
                "incarnation": 3,
                "platform": "Darwin arm64",
                "device": "Metal",
                "cores": 10,
                "memory_gb": 32.0,
                "load": 0.42,
                "battery": None,
                "job": "j7f3a",
                "role": "worker",
            },
            {
                "id": "n-mac2",
                "name": "mac2",
                "addr": "10.77.0.2:7946",
                "state": "alive",
                "incarnation": 1,
                "platform": "Darwin arm64",
                "device": "Metal",
                "cores": 8,
                "memory_gb": 16.0,
                "load": 0.91,
                "battery": {"percent": 64.0, "plugged": False},
                "job": "j7f3a",
                "role": "worker",
            },
            {
                "id": "n-linux1",
                "name": "linux-box",
                "addr": "10.77.0.3:7946",
                "state": "suspect",
                "incarnation": 5,
                "platform": "Linux x86_64",
                "device": "CUDA",
                "cores": 16,
                "memory_gb": 64.0,
                "load": 0.12,
                "battery": None,
                "job": None,
                "role": None,
            },
            {
                "id": "n-old",
                "name": "old-laptop",
                "addr": "10.77.0.4:7946",
                "state": "dead",
                "incarnation": 2,
                "platform": "Linux x86_64",
                "device": "CPU",
                "cores": 4,
                "memory_gb": 8.0,
                "load": None,
                "battery": {"percent": 8.0, "plugged": True},
                "job": None,
                "role": None,
            },
        ],
        "events": [
            {"t": T0 + 0, "kind": "joined", "node": "mac1", "detail": "10.77.0.1:7946"},
            {"t": T0 + 2, "kind": "leader", "node": "mac1", "detail": "elected (term 1)"},
            {"t": T0 + 5, "kind": "joined", "node": "mac2", "detail": "10.77.0.2:7946"},
            {"t": T0 + 9, "kind": "joined", "node": "linux-box", "detail": "10.77.0.3:7946"},
            {"t": T0 + 12, "kind": "joined", "node": "old-laptop", "detail": "10.77.0.4:7946"},
            {"t": T0 + 80, "kind": "suspect", "node": "old-laptop", "detail": "no ack from 2 probes"},
            {"t": T0 + 85, "kind": "dead", "node": "old-laptop", "detail": "suspicion timed out"},
            {"t": T0 + 97, "kind": "suspect", "node": "linux-box", "detail": "indirect probe failed"},
        ],
        "jobs": [
            {
                "job": "j7f3a",
                "script": "examples/mnist.py",
                "state": "running",
                "nodes": ["mac1", "mac2"],
                "epoch": 2,
                "epochs": 3,
                "step": 270,
                "loss": 0.0812,
                "test_accuracy": 0.9784,
            },
        ],
        "drops": {"malformed": 0, "bad_tag": 3, "replayed": 1},
    }


def empty_mesh() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "self": "n-solo",
        "leader": None,
        "nodes": [],
        "events": [],
        "jobs": [],
        "drops": {},
    }


def running_job() -> dict[str, Any]:
    return {
        "job": "j7f3a",
        "script": "examples/mnist.py",
        "state": "running",
        "message": None,
        "size": 3,
        "epoch": 2,
        "epochs": 3,
        "step": 270,
        "steps_per_epoch": 469,
        "loss": 0.0812,
        "test_accuracy": 0.9784,
        "samples_per_s": 12340.0,
        "ring_mb_s": 812.5,
        "eta_s": 42.0,
        "started": T0,
        "elapsed_s": 73.0,
        "workers": [
            {"node": "mac1", "rank": 0, "samples_per_s": 5120.0, "step": 270, "loss": 0.0790, "share": 0.42},
            {"node": "mac2", "rank": 1, "samples_per_s": 4210.0, "step": 270, "loss": 0.0833, "share": 0.34},
            {
                "node": "linux-box",
                "rank": 2,
                "samples_per_s": 3010.0,
                "step": 270,
                "loss": 0.0815,
                "share": 0.24,
            },
        ],
        "events": mesh()["events"][:5],
        "log": [
            "[mac1] loaded MNIST: 60000 train, 10000 test",
            "[mac1] epoch 1/3  loss 0.2411  test accuracy 96.12%  41.2s",
        ],
        "loss_history": [
            2.3,
            1.1,
            0.62,
            0.41,
            0.33,
            0.28,
            0.22,
            0.19,
            0.15,
            0.13,
            0.11,
            0.1,
            0.09,
            0.085,
            0.081,
        ],
    }


def waiting_job() -> dict[str, Any]:
    return {
        "job": "j9c01",
        "script": "examples/mnist.py",
        "state": "waiting",
        "message": "waiting for 3 nodes: have mac1, mac2",
        "size": 2,
        "epochs": 3,
    }


def failed_job() -> dict[str, Any]:
    job = running_job()
    job.update(
        state="failed",
        message="[mac2] ZeroDivisionError: division by zero (examples/mnist.py:88)",
        eta_s=None,
        log=job["log"]
        + ["[mac2] Traceback (most recent call last):", "[mac2] ZeroDivisionError: division by zero"],
    )
    return job


def done_job() -> dict[str, Any]:
    job = running_job()
    job.update(state="done", epoch=3, step=469, test_accuracy=0.9812, eta_s=0.0, elapsed_s=118.0, loss=0.052)
    job["log"] = job["log"] + [
        "[mac1] epoch 2/3  loss 0.0931  test accuracy 97.70%  38.9s",
        "[mac1] epoch 3/3  loss 0.0520  test accuracy 98.12%  38.1s",
    ]
    return job
