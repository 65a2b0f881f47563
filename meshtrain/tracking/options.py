"""What `meshtrain run` adds to a job's options for its record: ``options["tracking"]``.

The submitter is the only side that sees the script's directory, so the git commit and dirty
flag are read here; `--report-to` is checked here too, so a typo is one line before the job
starts and a library missing on this machine is named once (the recording agent skips what
it lacks in the same way).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from meshtrain.tracking.record import git_info
from meshtrain.tracking.reporters import parse_report_to, unavailable_line


def tracking_options(
    script: str, report_to: Iterable[str] = (), report_dir: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    git = git_info(script)
    if git:
        out["git"] = git
    names = parse_report_to(report_to)
    if names:
        line = unavailable_line(names)
        if line:
            print(f"meshtrain: {line}", file=sys.stderr)
        out["report_to"] = names
    if report_dir:
        out["report_dir"] = os.path.abspath(report_dir)
    return out
