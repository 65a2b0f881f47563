"""Command line: `meshtrain join | run | status | leave | checkpoints | export | doctor`.

One module per command (join.py, run.py, ...), registered in parser.py's
`COMMANDS`; `agent_link.py` is how a command reaches this machine's agent.
Every user mistake ends as one line on stderr and a non-zero exit code;
tracebacks are for bugs only (and for the user's own script, shown once).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from meshtrain.cli.parser import CommandError, build_parser, parse, port, positive, seed, split_run_args
from meshtrain.errors import UserError

__all__ = ["build_parser", "main", "parse", "port", "positive", "seed", "split_run_args"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        return int(args.handler(args))
    except UserError as exc:
        prog = exc.prog if isinstance(exc, CommandError) else "meshtrain"
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `meshtrain status --json | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
