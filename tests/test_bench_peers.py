"""bench/peers.py end to end at N=2 on loopback, tiny and short; and its PyTorch port equals the MLX GPT.

Real `meshtrain join` agents, a real MLX ring, real gloo (where torch is
installed: the DDP leg is skipped cleanly otherwise), the real corpus.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


@pytest.mark.timeout(420)
def test_peers_side_by_side_at_two_nodes_on_loopback() -> None:
    modes = ["meshtrain-bf16", "mlx-fp32", "local-sgd"] + (["ddp-fp32"] if _has_torch() else [])
    cmd = [sys.executable, str(ROOT / "bench" / "peers.py"), "--nodes", "2", "--links", "loopback"]
    cmd += ["--steps", "6", "--warmup-steps", "2", "--batch-size", "4", "--block-size", "32"]
    cmd += ["--eval-batches", "2", "--sync-every", "3", "--max-run-s", "120", "--ceiling", "--modes", *modes]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "global batch 4 x 32 = 128 tokens a step" in text and "1 core(s) of its own" in text, text[:2000]
    rows = {
        m[1]: m
        for m in re.finditer(
            r"^loopback\s+2 (\S+)\s+([\d,]+)\s+([\d.]+)\s+\S+\s+(~[\d.]+)\s+([\d.]+)", text, re.M
        )
    }
    assert set(rows) == set(modes), text[-3000:]
    for mode, row in rows.items():
        assert float(row[2].replace(",", "")) > 0 and float(row[3]) > 0, mode
        assert 0 < float(row[5]) < 10, mode  # a validation loss after the same 6 steps
    # the ring's share of the gradient bytes, computed on loopback: bf16 is half of fp32, local SGD 1/H of it
    sent = {mode: float(row[4][1:]) for mode, row in rows.items()}
    assert sent["meshtrain-bf16"] == pytest.approx(sent["mlx-fp32"] / 2, rel=0.01)
    assert sent["local-sgd"] == pytest.approx(sent["meshtrain-bf16"] / 3, rel=0.01)
    # every mode starts from the same weights and sees the same windows: per-step modes agree closely
    losses = {mode: float(row[5]) for mode, row in rows.items()}
    assert losses["meshtrain-bf16"] == pytest.approx(losses["mlx-fp32"], abs=0.02)
    if _has_torch():
        assert losses["ddp-fp32"] == pytest.approx(losses["mlx-fp32"], abs=0.02)
    assert re.search(r"^loopback\s+2 .*x \((mlx|ddp)-fp32\)", text, re.M), text[-2000:]  # the ratios row
    # --ceiling: one node at the local batch of 2 windows, twice its tokens/s; the row's last ratio over it
    ceiling = re.search(r"ceiling at N=2: ([\d,]+) tokens/s", text)
    assert ceiling is not None and float(ceiling[1].replace(",", "")) > 0, text[-3000:]
    assert re.search(r"^loopback\s+2 .*x \((meshtrain-bf16|local-sgd)\)\s*$", text, re.M), text[-2000:]


def test_a_bad_link_is_one_line() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "peers.py"), "--links", "fast"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "neither loopback nor a rate" in out.stderr
    assert "Traceback" not in out.stderr


def test_torch_port_computes_the_mlx_models_loss() -> None:
    torch = pytest.importorskip("torch")
    import mlx.core as mx
    from mlx.utils import tree_flatten

    lm = _load(ROOT / "examples" / "shakespeare.py", "shakespeare_for_peers_test")
    port = _load(ROOT / "bench" / "peers_torch.py", "peers_torch_for_test")
    config = dataclasses.replace(lm.SIZES["tiny"], vocab_size=80, block_size=32, n_layer=2)
    mx.random.seed(3)
    model = lm.GPT(config)
    tokens = np.random.default_rng(0).integers(0, 80, 4 * 33).astype(np.int32)
    starts = np.arange(4) * 33
    x, y = lm.windows(tokens, starts, 32)
    want = float(lm.loss_fn(model, x, y))
    twin = port.build_model(config)
    port.load_mlx_weights(twin, {k: np.array(v) for k, v in tree_flatten(model.parameters())})
    tx, ty = port.windows(tokens, starts, 32)
    logits = twin(tx).detach()
    got = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 80), ty.reshape(-1)))
    assert got == pytest.approx(want, abs=1e-4)
    # and after one step of each optimizer from the same gradients' arithmetic, still the same
    import mlx.nn as nn

    loss_and_grad = nn.value_and_grad(model, lm.loss_fn)
    optimizer = lm.make_optimizer(1e-2, 10, 0, 0.1)
    _, grads = loss_and_grad(model, x, y)
    optimizer.update(model, grads)
    mx.eval(model.parameters())
    twin.zero_grad()
    torch.nn.functional.cross_entropy(twin(tx).reshape(-1, 80), ty.reshape(-1)).backward()
    port.MlxAdamW(list(twin.parameters()), weight_decay=0.1).step(1e-2)
    after = float(lm.loss_fn(model, x, y))
    got_after = float(torch.nn.functional.cross_entropy(twin(tx).detach().reshape(-1, 80), ty.reshape(-1)))
    assert after < want and got_after == pytest.approx(after, abs=1e-3)
