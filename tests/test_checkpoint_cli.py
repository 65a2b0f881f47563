"""The CLI side of checkpoints: `run`'s flags become the job's options dict; `meshtrain checkpoints`
and `meshtrain export` read this machine's store ($MESHTRAIN_HOME/checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from meshtrain import cli
from meshtrain.checkpoints.options import CheckpointOptions, default_run_name
from meshtrain.checkpoints.store import CheckpointStore
from meshtrain.cli.run import checkpoint_options as _checkpoint_options
from meshtrain.errors import UserError


def test_run_flags_before_the_script_and_the_options_they_make() -> None:
    args = cli.parse(
        ["run", "--local", "2", "--checkpoint-every", "20", "--resume", "examples/mnist.py", "--epochs", "2"]
    )
    assert args.script_args == ["--epochs", "2"] and args.local == 2
    assert _checkpoint_options(args) == {
        "run": "mnist",
        "checkpoint_every": "20",
        "replicas": 2,
        "keep": 3,
        "resume": True,
    }
    args = cli.parse(
        [
            "run",
            "--checkpoint-every=30s",
            "--keep",
            "5",
            "--name",
            "exp-1",
            "--checkpoint-replicas",
            "0",
            "train.py",
        ]
    )
    assert _checkpoint_options(args) == {"run": "exp-1", "checkpoint_every": "30s", "replicas": 0, "keep": 5}
    assert _checkpoint_options(cli.parse(["run", "train.py", "--resume"])) == {}  # the script's flag


def test_flag_mistakes_are_one_line_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--checkpoint-every", "soon"], ["--checkpoint-every", "1.5"], ["--name", "../etc"]):
        assert cli.main(["run", *bad, "missing.py"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("meshtrain: bad") and "\n" not in err
    assert cli.main(["run", "--keep", "0", "missing.py"]) == 2
    with pytest.raises(UserError, match="checkpoint-replicas"):
        CheckpointOptions.build("x.py", every="5", replicas=-1)


def test_options_round_trip_and_default_names() -> None:
    assert default_run_name("examples/mnist.py") == "mnist"
    assert default_run_name("/x/my model!.py") == "my-model-"
    assert default_run_name("_.py") == "run"
    built = CheckpointOptions.build("a.py", every="1h", keep=2, resume=True)
    again = CheckpointOptions.from_dict(json.loads(json.dumps(built.to_dict())))
    assert again == built and again.policy is not None and again.policy.every_seconds == 3600
    assert CheckpointOptions.from_dict({}) is None
    assert CheckpointOptions.build("a.py").to_dict() == {}


def test_checkpoints_and_export_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHTRAIN_HOME", str(tmp_path / "home"))
    store = CheckpointStore()
    assert store.root == tmp_path / "home" / "checkpoints"
    w = mx.arange(6, dtype=mx.float32)
    for step in (10, 20, 30):
        store.save(
            "mnist", step, {"w": w * step}, metrics={"loss": 1.0 / step}, manifest={"replicas": ["n1", "n2"]}
        )
    store.write_part("mnist", 40, {"w": w})  # written, never committed: not a model version
    assert cli.main(["checkpoints", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(r["run"], [c["step"] for c in r["checkpoints"]]) for r in listing] == [("mnist", [10, 20, 30])]
    assert cli.main(["checkpoints", "mnist", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"][-1]["replicas"] == ["n1", "n2"]
    assert cli.main(["checkpoints", "mnist"]) == 0
    assert "n1, n2" in capsys.readouterr().out
    assert cli.main(["export", "mnist@20", str(tmp_path / "model")]) == 0
    assert "step 20" in capsys.readouterr().out
    loaded = mx.load(str(tmp_path / "model.safetensors"))
    assert isinstance(loaded, dict) and mx.array_equal(loaded["w"], w * 20).item()
    assert cli.main(["export", "mnist@40", str(tmp_path / "x")]) == 2
    assert "no complete checkpoint at step 40" in capsys.readouterr().err
