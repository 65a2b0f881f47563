"""The worker's side of tracking: what a script is, read without a line of tracking code in it.

`install(report, overrides)` runs in the worker before the user's script:

- it reports the worker's software (MLX and Python versions, platform) once,
  so the run record says what every node ran;
- it wraps `argparse.ArgumentParser.parse_args` so the first namespace the
  script parses (defaults included, which its command line does not show) is
  reported as hyper-parameters;
- it keeps `overrides` (a sweep trial's values), which `mesh.config(...)`
  applies to the names the script declares.

Reports go through the worker's ordinary metric channel under reserved keys
(`record.CONFIG_KEY` and friends), so nothing else in the job path changes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from collections.abc import Callable, Mapping
from typing import Any

from meshtrain.tracking.record import ARGPARSE_KEY, CONFIG_KEY, ENV_KEY, clean_params

_REPORT: Callable[[dict[str, Any]], None] | None = None
_OVERRIDES: dict[str, Any] = {}
_PARSED = False


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install(report: Callable[[dict[str, Any]], None], overrides: Mapping[str, Any] | None = None) -> None:
    """Start capturing for this worker process (see the module docstring)."""
    global _REPORT, _PARSED
    _REPORT = report
    _PARSED = False
    _OVERRIDES.clear()
    _OVERRIDES.update(overrides or {})
    report(
        {
            ENV_KEY: {
                "mlx": _version("mlx"),
                "meshtrain": _version("meshtrain"),
                "python": platform.python_version(),
                "platform": f"{platform.system()} {platform.machine()}",
            }
        }
    )
    original = argparse.ArgumentParser.parse_known_args
    if getattr(original, "_meshtrain_capture", False):
        return

    def parse_known_args(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        global _PARSED
        namespace, extra = original(self, *args, **kwargs)
        if not _PARSED and _REPORT is not None and isinstance(namespace, argparse.Namespace):
            _PARSED = True  # the script's own top-level parse; later parses are its business
            _REPORT({ARGPARSE_KEY: clean_params(vars(namespace))})
        return namespace, extra

    parse_known_args._meshtrain_capture = True  # type: ignore[attr-defined]
    argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def config(params: Mapping[str, Any]) -> dict[str, Any]:
    """`mesh.config(...)`: the declared values with a sweep's overrides applied, reported once."""
    values = {k: _OVERRIDES.get(k, v) for k, v in params.items()}
    if _REPORT is not None:
        _REPORT({CONFIG_KEY: clean_params(values)})
    return values
