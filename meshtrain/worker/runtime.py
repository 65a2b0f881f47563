"""The worker process: runs one rank of a job's user script (`python -m meshtrain.worker`).

The agent starts it with its part of the job in $MESHTRAIN_JOB_SPEC
(meshtrain.jobspec.WorkerSpec: job, rank, size, node, generation, script,
args, bind, report_fd, member, the job's options; the node's defaults in
their own variables). The handshake:

1. bind the ring listener and tell the agent its port ("ready" on the report pipe);
2. start reading the job's membership views from stdin (meshtrain.worker.views);
3. install the job's elastic `Mesh` so `meshtrain.init()` returns it, and run
   the script as `__main__`; the ring forms at its first `batches`/`allreduce`.

An exception in the script is sent to the agent once, as a "crash" message
with the traceback trimmed to the user's frames, instead of being printed:
the submitter shows the first crash of the job, not one per worker. A
`PeerLost` is marked secondary: it is the echo of another worker's crash.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from types import TracebackType
from typing import Any

from meshtrain import env as env_names
from meshtrain import mesh as mesh_module
from meshtrain.errors import PeerLost, UserError
from meshtrain.jobspec import JobSpecError, WorkerSpec
from meshtrain.worker.mesh import WorkerMesh
from meshtrain.worker.reporter import Reporter
from meshtrain.worker.views import ViewBoard

SPEC_ENV = env_names.JOB_SPEC
RING_CONNECT_TIMEOUT_S = 30.0
EXIT_CRASH = 1
EXIT_NO_START = 3


def _user_traceback(exc: BaseException, script: str) -> str:
    """The traceback from the first frame of the user's script on (runtime frames hidden)."""
    tb: TracebackType | None = exc.__traceback__
    script_path = os.path.abspath(script)
    probe = tb
    while probe is not None and os.path.abspath(probe.tb_frame.f_code.co_filename) != script_path:
        probe = probe.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, probe or tb))
    return text.replace(os.path.dirname(script_path) + os.sep, "")  # the job's temp dir means nothing here


def _take_keyring() -> Any:
    """The mesh secret the agent handed over in MESHTRAIN_SECRET, removed from the environment
    so the user's subprocesses do not inherit it; None on a mesh without a secret."""
    from meshtrain.security import ENV_SECRET, Keyring

    text = os.environ.pop(ENV_SECRET, None)
    return Keyring.from_text(text, ENV_SECRET) if text else None


def _make_mesh(spec: WorkerSpec, reporter: Reporter) -> WorkerMesh:
    """Bind the ring listener, tell the agent its port, start reading views: the elastic mesh."""
    from meshtrain.ring import RingListener

    keyring = _take_keyring()  # before the user's script is imported
    listener = RingListener.bind(host=spec.bind, port=0)
    reporter.send({"k": "ready", "ring_port": listener.port})
    views = ViewBoard(sys.stdin).start()
    checkpoints = None
    if spec.options.checkpointing:
        from meshtrain.worker.checkpointing import WorkerCheckpoints

        checkpoints = WorkerCheckpoints.create(
            spec.options.to_wire(), node=spec.node, member=spec.member_id, report=reporter.send
        )
        if checkpoints is not None:
            views.on_message = checkpoints.on_message
    return WorkerMesh(
        member=spec.member_id,
        job=spec.job,
        node=spec.node,
        listener=listener,
        views=views,
        reporter=reporter,
        keyring=keyring,
        joiner=bool(spec.options.joiner),
        ledger_dir=spec.ledger_dir,
        checkpoints=checkpoints,
        share_mode=spec.share_mode,
        shard_replicas=spec.options.shard_replicas,
        on_battery=spec.battery_policy,
    )


def _ring_report(mesh: WorkerMesh, reporter: Reporter) -> None:
    """The agent adds refused ring hellos (strangers, replays) to its drop counters."""
    drops = getattr(mesh._listener, "drops", None)
    reporter.send({"k": "ring", "drops": drops.snapshot() if drops is not None else {}})
    if mesh.ring_authenticated is not None:
        reporter.send({"k": "ring", "authenticated": mesh.ring_authenticated})


def run(spec: WorkerSpec) -> int:
    """Run the script as this worker; the exit status the agent sees."""
    reporter = Reporter(spec.report_fd)
    mesh = _make_mesh(spec, reporter)
    if not spec.options.joiner:
        try:
            mesh.connect(RING_CONNECT_TIMEOUT_S)
        except PeerLost as exc:
            reporter.send({"k": "crash", "summary": str(exc), "traceback": "", "secondary": True})
            reporter.close()
            return EXIT_CRASH
        _ring_report(mesh, reporter)
    mesh_module._MESH = mesh
    # experiment tracking: report this worker's versions and the script's argparse hyper-parameters;
    # a sweep trial's values are what `mesh.config(...)` returns (meshtrain.tracking.capture)
    from meshtrain.tracking import capture

    capture.install(reporter.report, (spec.options.tracking or {}).get("params"))
    script = os.path.abspath(spec.script)
    sys.argv = [spec.script, *spec.args]
    sys.path.insert(0, os.path.dirname(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001 - every failure of user code is reported, once
        # a UserError is a mistake the message names (meshtrain's API used wrongly): one line, no traceback
        mistake = isinstance(exc, UserError)
        summary = str(exc) if mistake else traceback.format_exception_only(type(exc), exc)[-1].strip()
        secondary = isinstance(exc, (PeerLost, ConnectionError, KeyboardInterrupt))
        reporter.send(
            {
                "k": "crash",
                "summary": summary,
                "traceback": "" if mistake else _user_traceback(exc, script),
                "secondary": secondary,
                "rollback": bool(getattr(exc, "rolls_back", False)),  # meshtrain.shard's ShardLost
            }
        )
        code = EXIT_CRASH
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            if mesh._checkpoints is not None:  # a part being written finishes, is acked, maybe committed
                mesh._checkpoints.close()
        except Exception:  # noqa: BLE001 - a checkpoint's trouble must not mask the script's status
            pass
        try:
            _ring_report(mesh, reporter)
            mesh.close()
        except Exception:  # noqa: BLE001 - closing a broken ring must not mask the script's status
            pass
    return code


def main() -> int:
    if SPEC_ENV not in os.environ:
        print("meshtrain.worker is started by a meshtrain agent, not by hand", file=sys.stderr)
        return 2
    try:
        spec = WorkerSpec.from_env(os.environ)
    except JobSpecError as exc:
        print(f"meshtrain.worker: {exc}", file=sys.stderr)
        return 2
    return run(spec)
