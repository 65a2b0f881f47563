"""examples/mnist.py loaded as a module, so a bench times and trains exactly the model users train."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist.py"


def load_example() -> ModuleType:
    """examples/mnist.py as a fresh module (its MLP, CNN, optimizer, step functions and evaluation)."""
    spec = importlib.util.spec_from_file_location("mnist_example_script", EXAMPLE)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {EXAMPLE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
