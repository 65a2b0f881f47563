"""Command line: `meshtrain join | run | status | doctor`.

Every user mistake ends as one line on stderr and a non-zero exit code;
tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshtrain.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="what this machine offers: MLX device, BLAS, cores, interfaces")
    doctor.set_defaults(handler=_doctor)
    return parser


def _doctor(args: argparse.Namespace) -> int:
    from meshtrain import doctor

    return doctor.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except UserError as exc:
        print(f"meshtrain: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
