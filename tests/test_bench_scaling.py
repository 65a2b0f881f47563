"""bench/scaling.py's pure parts: per-N tables and time-to-accuracy from a job's evaluations."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from meshtrain import datasets

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scaling() -> ModuleType:
    return load("scaling")


def test_per_n_tables_take_the_largest_n_listed_below(scaling: ModuleType) -> None:
    table = scaling.parse_per_n("1=256,2=512,4=1024", int)
    assert [scaling.epochs_for(n, table) for n in (1, 2, 3, 4, 8)] == [256, 512, 512, 1024, 1024]
    assert scaling.epochs_for(8, scaling.parse_per_n("0.002", float)) == 0.002


def test_time_to_target_is_the_first_evaluation_at_it_less_evaluating_if_asked(scaling: ModuleType) -> None:
    run = scaling.Run(started_at=2.0)
    for acc, at, evaluating in ((97.0, 5.0, 0.5), (98.1, 9.0, 1.0), (97.9, 12.0, 1.5), (98.3, 15.0, 2.0)):
        run.evals.append((acc, at))
        run.eval_s.append(evaluating)
    assert run.time_to(98.0) == 7.0
    assert run.time_to(98.0, training_only=True) == 6.0
    assert run.time_to(99.0) is None


def test_the_ceiling_uses_the_ring_law(scaling: ModuleType) -> None:
    bound = load("tta_bound")
    assert bound.allreduce_s(1, 1e6, "1gbit") == 0.0
    two, eight = bound.allreduce_s(2, 1e6, "1gbit"), bound.allreduce_s(8, 1e6, "1gbit")
    assert eight / two == pytest.approx(1.75)  # 2(N-1)/N: 1 at N=2, 1.75 at N=8
    assert bound.allreduce_s(2, 1e6, "100mbit") == pytest.approx(10 * two)


@pytest.mark.skipif(
    datasets.bundled_path() is None and not datasets.cache_path("train").is_file(), reason="no MNIST here"
)
def test_the_ceiling_bench_runs_end_to_end(tmp_path: Path) -> None:
    saved = tmp_path / "epochs.json"
    args = ["--batches", "1024", "--lrs", "1e-3", "--schedules", "1", "--target", "80", "--nodes", "1", "2"]
    args += ["--local-sgd", "2:4:512", "--local-sgd-schedules", "1"]
    result = subprocess.run(
        [sys.executable, str(BENCH / "tta_bound.py"), *args, "--links", "1gbit", "--save-epochs", str(saved)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert list(json.loads(saved.read_text())) == ["1024"]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert [r[:2] for r in rows] == [["1", "free"], ["2", "free"], ["2", "1gbit"]], result.stdout
    assert float(rows[0][-2].rstrip("x")) == 1.0
    assert "N=2 H=4 B=512, 1-epoch schedule: " in result.stdout and "at most" in result.stdout, result.stdout
