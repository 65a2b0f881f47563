"""examples/lm_finetune.py: an mlx-lm model built locally (a tiny random Llama, config.json + safetensors +
tokenizer, nothing downloaded) fine-tuned on text across `meshtrain run --local 2`, with LoRA and fully;
what it saves loads back with `mlx_lm.load` and has a lower loss on the text than the model it started
from. Skipped when mlx-lm is not installed (`pip install 'meshtrain[mlx-lm]'`)."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

mlx_lm = pytest.importorskip("mlx_lm", reason="pip install 'meshtrain[mlx-lm]'")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "lm_finetune.py"
QUICK = ["--steps", "24", "--eval-every", "12", "--block-size", "48", "--batch-size", "8", "--lr", "2e-3"]


def tiny_llama(out: Path, text: str) -> Path:
    spec = importlib.util.spec_from_file_location("tiny_llama_example", ROOT / "examples" / "tiny_llama.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.build(out, text, vocab_size=400, hidden=64, layers=2))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """work/model (a tiny Llama) and work/text.txt (a small grammar of words: learnable in a few steps)."""
    root = tmp_path_factory.mktemp("lm")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in the mind to suffer".split()
    lines = [" ".join(words[(i + rng.randrange(3)) % len(words)] for i in range(12)) for _ in range(500)]
    text = root / "work" / "text.txt"
    text.parent.mkdir()
    text.write_text("\n".join(lines) + "\n")
    tiny_llama(root / "work" / "model", text.read_text())
    return root


def meshtrain_run(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(cwd / "home")}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def text_loss(model: object, tokenizer: object, text: str) -> float:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    ids = np.asarray(tokenizer.encode(text), dtype=np.int32)[: 48 * 32 + 1]  # type: ignore[attr-defined]
    w = mx.array(ids[: (len(ids) - 1) // 48 * 48 + 1])
    x, y = w[:-1].reshape(-1, 48), w[1:].reshape(-1, 48)
    return float(nn.losses.cross_entropy(model(x), y).mean().item())  # type: ignore[operator]


def before_after(out: str) -> tuple[float, float]:
    m = re.search(r"validation loss after: ([\d.]+) \(before: ([\d.]+)\)", out)
    assert m, out[-3000:]
    return float(m[1]), float(m[2])


@pytest.mark.timeout(300)
def test_lora_on_a_local_mesh_of_two_saves_adapters_mlx_lm_loads(workspace: Path) -> None:
    work, save = workspace / "work", workspace / "adapters"
    out = meshtrain_run(
        workspace,
        "--local", "2", str(EXAMPLE),
        "--model", str(work / "model"), "--data", str(work / "text.txt"), "--save", str(save), *QUICK,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "LoRA rank 8 on 2 blocks" in out.stdout and "running on 2 nodes" in out.stdout
    after, before = before_after(out.stdout)
    assert after < before - 0.5, (before, after)
    assert {p.name for p in save.iterdir()} == {"adapters.safetensors", "adapter_config.json"}
    text = (work / "text.txt").read_text()
    base, tok = mlx_lm.load(str(work / "model"))
    tuned, _ = mlx_lm.load(str(work / "model"), adapter_path=str(save))
    assert text_loss(tuned, tok, text) < text_loss(base, tok, text) - 0.5


@pytest.mark.timeout(300)
def test_full_fine_tuning_with_model_and_text_shipped_by_run_data(workspace: Path) -> None:
    save = workspace / "full"
    out = meshtrain_run(
        workspace,
        "--local", "2", "--data", "work", str(EXAMPLE),
        "--model", "model", "--data", "text.txt", "--full", "--save", str(save), *QUICK,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "full fine-tuning" in out.stdout
    after, before = before_after(out.stdout)
    assert after < before, (before, after)
    text = (workspace / "work" / "text.txt").read_text()
    base, tok = mlx_lm.load(str(workspace / "work" / "model"))
    tuned, _ = mlx_lm.load(str(save))
    assert text_loss(tuned, tok, text) < text_loss(base, tok, text)


def test_a_model_directory_without_config_json_is_one_line(workspace: Path) -> None:
    broken = workspace / "broken"
    shutil.copytree(workspace / "work" / "model", broken, dirs_exist_ok=True)
    (broken / "config.json").unlink()
    cmd = [
        sys.executable,
        str(EXAMPLE),
        "--model",
        str(broken),
        "--data",
        str(workspace / "work" / "text.txt"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=workspace)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"lm_finetune: --model {broken}: no config.json there (not an mlx-lm model directory)"
    )
