"""Command line: `meshtrain join | run | status | leave | checkpoints | export | doctor`.

Every user mistake ends as one line on stderr and a non-zero exit code;
tracebacks are for bugs only (and for the user's own script, shown once).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from meshtrain.errors import UserError

DEFAULT_PORT = 7946
DEFAULT_WAIT_S = 30.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a UserError: one line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def seed(text: str) -> tuple[str, int]:
    """HOST:PORT (PORT defaults to 7946)."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(DEFAULT_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshtrain", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    join = sub.add_parser("join", help="run this machine's agent: join (or start) the mesh and show it live")
    join.add_argument("--name", help="this node's name in the mesh (default: the host name)")
    join.add_argument(
        "--seed",
        action="append",
        type=seed,
        default=[],
        metavar="HOST:PORT",
        help="a member to join through (repeatable); LAN peers are found without one",
    )
    join.add_argument("--token", help="join the mesh this token names (the first `join` prints the command)")
    join.add_argument(
        "--secret-file",
        metavar="FILE",
        help="read the mesh secret from FILE (mode 0600); MESHTRAIN_SECRET is honoured too",
    )
    join.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt all mesh traffic (AES-GCM), not only authenticate it; the printed token carries it",
    )
    join.add_argument("--interface", help="network interface to use for discovery and traffic")
    join.add_argument(
        "--profile",
        choices=("lan", "wifi", "local"),
        default="lan",
        help="failure-detection timing for the network (default: lan)",
    )
    join.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"gossip UDP port (default {DEFAULT_PORT})"
    )
    join.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    join.add_argument("--no-discovery", action="store_true", help="do not broadcast LAN beacons")
    join.add_argument(
        "--detach", action="store_true", help="run in the background (stop with `meshtrain leave`)"
    )
    join.add_argument("--log", metavar="FILE", help="with --detach: where the agent writes its log")
    join.add_argument(
        "--on-battery",
        choices=("continue", "reduce", "leave"),
        default="reduce",
        help="on battery or hot: keep this node's share, halve it (default), or take none",
    )
    join.set_defaults(handler=_handler("join"))

    run = sub.add_parser(
        "run", allow_abbrev=False, help="train SCRIPT on the mesh (or alone, or on a --local mesh)"
    )
    run.add_argument("script", metavar="SCRIPT")
    run.add_argument(
        "script_args",
        nargs="*",
        metavar="ARG",
        help="arguments for the script (anywhere after SCRIPT; after `--` if they clash with ours)",
    )
    run.add_argument("--nodes", help="how many nodes (N) or which (name,name); default: all that are up")
    run.add_argument(
        "--min-nodes", type=positive, help="start with this many if --nodes are not all up in time"
    )
    run.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for nodes (default {DEFAULT_WAIT_S:.0f}s with --nodes, else 0)",
    )
    run.add_argument(
        "--local", type=positive, metavar="N", help="an embedded mesh of N local nodes, just for this run"
    )
    run.add_argument(
        "--checkpoint-every",
        metavar="STEPS|PERIOD",
        help="take a coordinated checkpoint every STEPS steps (200) or every PERIOD (30s, 5m, 1h)",
    )
    run.add_argument(
        "--checkpoint-replicas",
        type=int,
        default=2,
        metavar="K",
        help="whole copies of each checkpoint besides the first, on other nodes (default 2)",
    )
    run.add_argument(
        "--keep",
        type=positive,
        default=3,
        metavar="N",
        help="complete checkpoints each node keeps (default 3)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's newest complete checkpoint, wherever in the mesh it is",
    )
    run.add_argument(
        "--name", metavar="RUN", help="the run's name for its checkpoints (default: the script's stem)"
    )
    run.add_argument(
        "--shares",
        choices=("perf", "equal"),
        default="perf",
        help="each node's share of the global batch: by measured speed (default) or equal",
    )
    run.add_argument(
        "--ledger",
        metavar="DIR",
        help="debug: every worker logs the sample indices of each committed step to DIR on its node",
    )
    run.set_defaults(handler=_handler("run"))

    status = sub.add_parser("status", help="the mesh and its jobs, as this machine's agent sees them")
    status.add_argument("--watch", action="store_true", help="keep showing it, live")
    status.add_argument("--json", action="store_true", help="print the mesh snapshot as JSON")
    status.set_defaults(handler=_handler("status"))

    leave = sub.add_parser("leave", help="stop this machine's agent; it leaves the mesh gracefully")
    leave.set_defaults(handler=_handler("leave"))

    from meshtrain.checkpoints.commands import add_parsers as add_checkpoint_parsers

    add_checkpoint_parsers(sub)

    doctor = sub.add_parser("doctor", help="what this machine offers: MLX device, BLAS, cores, interfaces")
    doctor.set_defaults(handler=_doctor)
    return parser


def _handler(name: str):  # type: ignore[no-untyped-def]
    def call(args: argparse.Namespace) -> int:
        from meshtrain.agent import commands

        return int(getattr(commands, name)(args))

    return call


def _doctor(args: argparse.Namespace) -> int:
    from meshtrain import doctor  # type: ignore[attr-defined]

    return int(doctor.run(args))


RUN_VALUE_FLAGS = (
    "--shares",
    "--ledger",
    "--nodes",
    "--min-nodes",
    "--wait",
    "--local",
    "--checkpoint-every",
    "--checkpoint-replicas",
    "--keep",
    "--name",
)
RUN_SWITCHES = ("--resume",)


def split_run_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(meshtrain's own `run` arguments, the script's), keeping the script's in order.

    `run`'s flags may come before or after SCRIPT (`run mnist.py --local 2 --epochs 1`);
    anything else after SCRIPT is the script's, and everything after `--` is too.
    """
    ours: list[str] = []
    theirs: list[str] = []
    have_script = False
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            theirs.extend(argv[i + 1 :])
            break
        name = token.split("=", 1)[0]
        if name in RUN_VALUE_FLAGS:
            take = 1 if "=" in token else 2
            ours.extend(argv[i : i + take])
            i += take
            continue
        if token in RUN_SWITCHES:
            ours.append(token)
        elif token in ("-h", "--help") or not have_script:
            ours.append(token)
            have_script = have_script or not token.startswith("-")
        else:
            theirs.append(token)
        i += 1
    return ours, theirs


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line (see `split_run_args` for how `run` shares it with the script)."""
    parser = build_parser()
    if not argv or argv[0] != "run":
        return parser.parse_args(argv)
    ours, theirs = split_run_args(argv[1:])
    args = parser.parse_args(["run", *ours])
    args.script_args = theirs
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        return int(args.handler(args))
    except UserError as exc:
        print(f"meshtrain: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `meshtrain status --json | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
