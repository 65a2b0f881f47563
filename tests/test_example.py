"""examples/mnist.py as a user runs it, and the models it defines."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from meshtrain import datasets

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mnist_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cnn_and_mlp_have_the_documented_sizes() -> None:
    from mlx.utils import tree_flatten

    example = load_example()
    sizes = {}
    for name, build in example.MODELS.items():
        params: Any = tree_flatten(build().trainable_parameters())
        sizes[name] = sum(p.nbytes for _, p in params)
    assert sizes["cnn"] == 4_799_528  # gradients per step, as DATA.md states
    assert sizes["mlp"] == 4 * (784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10)


@pytest.mark.skipif(
    datasets.bundled_path() is None and not datasets.cache_path("train").is_file(), reason="no MNIST here"
)
def test_example_trains_and_prints_final_accuracy() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", "mlp", "--epochs", "1", "--train-limit", "5000"]
        + ["--evals-per-epoch", "4"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    evaluating = r"  \(evaluating so far \d+\.\d{2} s\)"
    mid = [
        line
        for line in lines
        if re.fullmatch(r"epoch 0\.\d\d/1  test accuracy \d+\.\d{2}%" + evaluating, line)
    ]
    assert len(mid) == 3, (
        lines
    )  # 40 steps, an evaluation every 10: after 10, 20 and 30; the 4th ends the epoch
    assert re.fullmatch(
        r"epoch 1/1  loss \d+\.\d{3}  test accuracy \d+\.\d{2}%  \d+\.\d s" + evaluating, lines[-2]
    ), lines
    match = re.fullmatch(r"final test accuracy: (\d+\.\d{2})%", lines[-1])
    assert match, lines
    assert 80.0 < float(match.group(1)) <= 100.0
    # bench/scaling.py reads these lines for time-to-accuracy
    spec = importlib.util.spec_from_file_location(
        "scaling_bench", EXAMPLE.parent.parent / "bench" / "scaling.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert [bool(bench.MID_EPOCH_LINE.search(line)) for line in lines[-6:-2]] == [False, True, True, True]
    assert bench.EPOCH_LINE.search(lines[-2]) and bench.EVAL_TIME.search(lines[-2])
