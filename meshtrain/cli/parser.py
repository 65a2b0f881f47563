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
COMMANDS: tuple[str, ...] = (
    "join",
    "run",
    "status",
    "leave",
    "checkpoints",
    "doctor",
    "runs",
    "tag",
    "sweep",
    "dashboard",
)
COMMANDS += ("attach", "jobs", "cancel", "logs")  # a job of the mesh, watched and steered from any node

DESCRIPTION = """Command line: `meshtrain join | run | status | leave | checkpoints | export | doctor`.

Every user mistake ends as one line on stderr and a non-zero exit code;
tracebacks are for bugs only (and for the user's own script, shown once).
"""


class CommandError(UserError):
    """A UserError said in a command's own name (`meshtrain run: missing SCRIPT`)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


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


def port(text: str) -> int:
    """A port to bind: 1-65535, or 0 for any free one."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port (1-65535, or 0 for any free one): {text!r}")
    return int(text)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from meshtrain import __version__

    parser = _Parser(prog="meshtrain", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"meshtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"meshtrain.cli.{name}").add_parser(sub)
    return parser


RUN_USAGE = "meshtrain run [OPTIONS] SCRIPT [ARGS...]"


def run_flags(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """`run`'s option strings, each with whether it takes a value (read from its subparser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            run = action.choices["run"]
            return {o: action_.nargs != 0 for action_ in run._actions for o in action_.option_strings}
    raise AssertionError("no subcommands")


def split_run_args(argv: Sequence[str], flags: dict[str, bool] | None = None) -> tuple[list[str], list[str]]:
    """(meshtrain's own `run` arguments ending in SCRIPT, the script's arguments).

    As with torchrun and mlx.launch, meshtrain's options go before SCRIPT and
    everything after SCRIPT is the script's, untouched (`run --local 2 t.py
    --local 3`: the script gets `--local 3`). A `--` before SCRIPT ends
    meshtrain's options (for a script whose name starts with `-`); one right
    after SCRIPT is dropped, as older command lines put it there.
    """
    flags = run_flags(build_parser()) if flags is None else flags
    ours: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest = list(argv[i + 1 :])
            if not rest:
                break
            return [*ours, "--", rest[0]], rest[1:]
        if token.startswith("-") and token != "-":
            name = token.split("=", 1)[0]
            if name not in flags:
                raise CommandError(
                    "meshtrain run",
                    f"unknown option {name} (meshtrain's options go before SCRIPT, the script's after it: "
                    f"{RUN_USAGE})",
                )
            take = 2 if flags[name] and "=" not in token else 1
            ours.extend(argv[i : i + take])
            i += take
            continue
        rest = list(argv[i + 1 :])
        return [*ours, "--", token], rest[1:] if rest[:1] == ["--"] else rest
    if any(t in ("-h", "--help") for t in ours):
        return ours, []
    raise CommandError("meshtrain run", f"missing SCRIPT ({RUN_USAGE})")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line (see `split_run_args` for how `run` shares it with the script)."""
    parser = build_parser()
    if not argv or argv[0] != "run":
        return parser.parse_args(argv)
    ours, theirs = split_run_args(argv[1:], run_flags(parser))
    args = parser.parse_args(["run", *ours])
    args.script_args = theirs
    return args
