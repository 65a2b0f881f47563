"""The `meshtrain` argument parser: the list of commands, the shared `_Parser` and argument types.

Each command is a module of this package with `add_parser(sub)` (its flags,
and `handler=` the function that runs it). Adding a command is one module
and one name in `COMMANDS`. The modules are imported only to build the
parser, so they import nothing heavy at the top (MLX, the agent, rich): those
come inside the handler, and `meshtrain --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from meshtrain.errors import UserError

DEFAULT_PORT = 7946

# Module names under meshtrain.cli, in the order `meshtrain --help` lists them
# (`checkpoints` registers both `checkpoints` and `export`).
COMMANDS: tuple[str, ...] = ("join", "run", "status", "leave", "checkpoints", "doctor", "runs", "tag", "dashboard")
COMMANDS += ("attach", "jobs", "cancel", "logs")  # a job of the mesh, watched and steered from any node

DESCRIPTION = """Command line: `meshtrain join | run | status | leave | checkpoints | export | doctor`.

Every user mistake ends as one line on stderr and a non-zero exit code;
tracebacks are for bugs only (and for the user's own script, shown once).
"""


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
    parser = _Parser(prog="meshtrain", description=DESCRIPTION, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"meshtrain.cli.{name}").add_parser(sub)
    return parser


RUN_VALUE_FLAGS = (
    "--notify",
    "--shares",
    "--ledger",
    "--nodes",
    "--min-nodes",
    "--wait",
    "--local",
    "--checkpoint-every",
    "--checkpoint-replicas",
    "--checkpoint-dir",
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
