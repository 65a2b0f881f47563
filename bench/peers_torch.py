"""examples/shakespeare.py's GPT in PyTorch, and a DDP (gloo, CPU) worker for bench/peers.py.

Why a port rather than any PyTorch GPT: the comparison is only fair if both
frameworks run the same arithmetic. So the shapes are the same (pre-norm
blocks, fused qkv projection, rotary embeddings as MLX's `nn.RoPE` computes
them, exact GELU, the output projection tied to the token embedding), the
initial weights are the MLX model's own (built from the same seed and copied
across, so every mode starts from the same point), the optimizer is MLX's
AdamW arithmetic (no bias correction, decoupled decay on every parameter) on
the same warm-up + cosine schedule (its rates read off the MLX optimizer), and
the gradient is clipped by its global norm after the average, as the MLX loops
do. What differs and is said in the
output: PyTorch runs eagerly (torch.compile needs a C++ toolchain and tens of
seconds of compiling per run), MLX compiles its step.

Nothing here runs at import time; torch is imported by the functions that
need it, so bench/peers.py can import this module to ask whether torch exists.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np


def torch_version() -> str | None:
    """torch's version, or None when it is not installed (the DDP leg is then skipped)."""
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def build_model(config: Any) -> Any:
    """A torch.nn.Module with examples/shakespeare.py's GPT shape for `config` (a GPTConfig)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, h = config.n_embd, config.n_head
    hd = d // h
    inv = 10000.0 ** (-(torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    theta = torch.arange(config.block_size, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cos(theta), torch.sin(theta)

    def rope(x: torch.Tensor) -> torch.Tensor:
        """MLX nn.RoPE(head_dim), traditional=False: rotate the two halves of each head."""
        t = x.shape[-2]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        c, s = cos[:t], sin[:t]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(x).split(d, dim=-1)
            q, k, v = (z.reshape(b, t, h, hd).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, scale=hd**-0.5)
            return self.proj(y.transpose(1, 2).reshape(b, t, d))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.attn = Attention()
            self.ln2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.out = nn.Linear(4 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln1(x))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(config.vocab_size, d)
            self.blocks = nn.ModuleList(Block() for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(d)
            std, resid = 0.02, 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's init, as the MLX model
            with torch.no_grad():
                self.embed.weight.normal_(0.0, std)
                for block in self.blocks:
                    for layer, scale in (
                        (block.attn.qkv, std),
                        (block.attn.proj, resid),
                        (block.fc, std),
                        (block.out, resid),
                    ):
                        layer.weight.normal_(0.0, scale)
                        layer.bias.zero_()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return F.linear(self.ln_f(x), self.embed.weight)

    return GPT()


def load_mlx_weights(model: Any, flat: dict[str, np.ndarray]) -> None:
    """Copy MLX parameters (tree_flatten names -> arrays) into the port: the names are the same."""
    import torch

    state = model.state_dict()
    missing = set(state) ^ set(flat)
    if missing:
        raise ValueError(f"parameter names differ between the MLX model and the port: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(flat[name], dtype=np.float32)))


class MlxAdamW:
    """MLX's AdamW step in torch: p *= 1 - lr*wd; m, v moving averages; p -= lr * m / (sqrt(v) + eps)."""

    def __init__(
        self, params: list[Any], betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1
    ):
        import torch

        self.params = params
        self.b1, self.b2 = betas
        self.wd, self.eps = weight_decay, 1e-8
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, lr: float) -> None:
        import torch

        with torch.no_grad():
            grads = [p.grad for p in self.params]
            torch._foreach_mul_(self.params, 1.0 - lr * self.wd)
            torch._foreach_mul_(self.m, self.b1)
            torch._foreach_add_(self.m, grads, alpha=1.0 - self.b1)
            torch._foreach_mul_(self.v, self.b2)
            torch._foreach_addcmul_(self.v, grads, grads, value=1.0 - self.b2)
            denom = torch._foreach_sqrt(self.v)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(self.params, self.m, denom, value=-lr)


def evaluate(model: Any, tokens: np.ndarray, block: int, batch: int, batches: int) -> float:
    """examples/shakespeare.py's `evaluate` in torch: mean loss over evenly spaced validation windows."""
    import torch
    import torch.nn.functional as F

    n = (len(tokens) - 1) // block
    starts = np.arange(n) * block
    if batches * batch < n:
        starts = starts[np.linspace(0, n - 1, batches * batch).astype(np.int64)]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            x, y = windows(tokens, starts[i : i + batch], block)
            logits = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))) * len(x)
            count += len(x)
    return total / max(count, 1)


def windows(tokens: np.ndarray, starts: np.ndarray, block: int) -> tuple[Any, Any]:
    import torch

    chunk = tokens[starts[:, None] + np.arange(block + 1)].astype(np.int64)
    return torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:])


def bf16_hook(group: Any, bucket: Any) -> Any:
    """DDP's bf16_compress_hook for gloo (torch's own refuses without CUDA/NCCL): each bucket
    cast to bfloat16 and divided by N, all-reduced (gloo sums bfloat16), cast back into the bucket."""
    import torch
    import torch.distributed as dist

    group = group if group is not None else dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut: Any) -> Any:
        out = bucket.buffer()
        out.copy_(fut.value()[0])
        return out

    return future.then(decompress)


bf16_hook.__annotations__ = {}  # DDP checks a hook's annotations, and these are strings here (PEP 563)


def worker(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """One DDP rank: `setup` is bench/peers.py's (config, MLX initial weights, tokens, schedule...)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    rank, size = args.rank, args.world
    host, port = args.addrs.split(",")[0].rsplit(":", 1)
    model = build_model(setup["config"])
    load_mlx_weights(model, setup["weights"])
    ddp: Any = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=size)
        ddp = DistributedDataParallel(model)
        if args.wire == "bf16":
            ddp.register_comm_hook(None, bf16_hook)
    optimizer = MlxAdamW(list(model.parameters()), weight_decay=setup["weight_decay"])
    params = list(model.parameters())
    train, block, lrs = setup["train"], setup["config"].block_size, setup["lrs"]

    def step(idx: np.ndarray, i: int) -> float:
        x, y = windows(train, setup["offset"] + idx * block, block)
        logits = ddp(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        for p in params:
            p.grad = None
        loss.backward()  # DDP averages the gradients here, bucket by bucket as they become ready
        torch.nn.utils.clip_grad_norm_(params, setup["clip"])
        optimizer.step(lrs[i])
        return float(loss)

    out = setup["loop"](step, rank, size)
    if rank == 0:
        out["val_loss"] = evaluate(model, setup["val"], block, setup["eval_batch"], setup["eval_batches"])
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out
