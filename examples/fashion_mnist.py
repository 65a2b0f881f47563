"""Train a small CNN on Fashion-MNIST: a plain MLX loop plus the few meshtrain calls.

Run it alone (`python examples/fashion_mnist.py`) or on a mesh (`meshtrain run
--local 2 examples/fashion_mnist.py`). The data is Debian's
`dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`), read by
`meshtrain.datasets.fashion_mnist`.

Models: `cnn` (conv16-pool-conv32-pool-fc128-fc10, 3x3 convolutions padded
to keep the size, ~220k parameters: small because MLX's CPU convolutions are
slow) and `mlp` (784-512-256-10, the fast fallback on a Linux CPU).
`--augment` adds random horizontal flips and shifts of up to 2 pixels.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

import meshtrain
from meshtrain.data.fashion_mnist import MEAN, STD
from meshtrain.datasets import fashion_mnist


class CNN(nn.Module):
    """conv16 (3x3, same) - 2x2 max-pool - conv32 - pool - fc128 - fc10, with dropout.

    No batch norm: its running statistics would follow each worker's own slice
    of the batch, and the mesh keeps every replica's state identical."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(7 * 7 * 32, 128)
        self.fc2 = nn.Linear(128, 10)
        self.dropout = nn.Dropout(0.3)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.pool(nn.relu(self.conv1(x)))
        x = self.pool(nn.relu(self.conv2(x)))
        x = self.dropout(nn.relu(self.fc1(x.reshape(x.shape[0], -1))))
        return self.fc2(x)


class MLP(nn.Module):
    """784-512-256-10 with ReLU and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(784, 512), nn.Linear(512, 256), nn.Linear(256, 10)]
        self.dropout = nn.Dropout(0.2)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = self.dropout(nn.relu(layer(x)))
        return self.layers[-1](x)


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": CNN, "mlp": MLP}
WIRE_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 NHWC centred with the training set's mean and spread."""
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[..., None]


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip half the images left-right and shift each by up to 2 pixels (zero padding)."""
    flip = rng.random(len(x)) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=float(-MEAN / STD))
    dy, dx = rng.integers(0, 5, len(x)), rng.integers(0, 5, len(x))
    rows = dy[:, None] + np.arange(28)
    cols = dx[:, None] + np.arange(28)
    return padded[np.arange(len(x))[:, None, None], rows[:, :, None], cols[:, None, :]]


def loss_fn(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def train_functions(
    model: nn.Module, optimizer: optim.Optimizer, compile: bool = True
) -> tuple[Callable[[mx.array, mx.array], tuple[mx.array, Any]], Callable[[Any], None]]:
    """(loss_and_grad, apply_update), compiled; the all-reduce runs between them."""
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


def evaluate(
    mesh: meshtrain.Mesh, model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000
) -> tuple[float, float]:
    """(accuracy, mean loss) on a split, dropout off; every worker evaluates its share (mesh.evaluate)."""

    def sums(indices: np.ndarray) -> dict[str, float]:
        correct, total = 0, 0.0
        for start in range(0, len(indices), batch):
            part = indices[start : start + batch]
            xb, yb = mx.array(x[part]), mx.array(y[part])
            logits = model(xb)
            correct += int(mx.sum(mx.argmax(logits, axis=1) == yb))
            total += float(nn.losses.cross_entropy(logits, yb, reduction="sum"))
        return {"correct": float(correct), "loss_sum": total}

    model.eval()
    result = mesh.evaluate(len(y), sums)
    model.train()
    return result["correct"] / len(y), result["loss_sum"] / len(y)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split across the mesh")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW rate (warm-up, then cosine)")
    parser.add_argument("--augment", action="store_true", help="random flips and 2-pixel shifts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--evals-per-epoch", type=int, default=1)
    parser.add_argument("--wire", choices=sorted(WIRE_DTYPES), default="bf16")
    parser.add_argument("--no-compile", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    mesh = meshtrain.init()  # first: on a Linux CPU this may re-exec with a fast BLAS
    args = parse_args(argv)
    if args.evals_per_epoch < 1 or args.epochs < 1:
        raise SystemExit("fashion_mnist.py: --epochs and --evals-per-epoch must be at least 1")
    train_images, train_labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    train_images, train_labels = train_images[: args.train_limit], train_labels[: args.train_limit]
    test_images, test_labels = test_images[: args.test_limit], test_labels[: args.test_limit]
    x_train, y_train = normalise(train_images), train_labels.astype(np.int32)
    x_test, y_test = normalise(test_images), test_labels.astype(np.int32)
    n_train = len(y_train)

    mx.random.seed(args.seed)
    model = MODELS[args.model]()
    mx.eval(model.parameters())
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = min(100, total // 10)
    decay = optim.cosine_decay(args.lr, max(1, total - warmup))
    schedule = decay
    if warmup:
        ramp = optim.linear_schedule(args.lr / 10, args.lr, warmup)
        schedule = optim.join_schedules([ramp, decay], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=1e-4)
    mesh.register(model, optimizer)
    loss_and_grad, apply_update = train_functions(model, optimizer, compile=not args.no_compile)
    zero_grads = tree_map(mx.zeros_like, model.trainable_parameters())
    wire = WIRE_DTYPES[args.wire]
    eval_every = max(1, math.ceil(steps_per_epoch / args.evals_per_epoch))
    if mesh.is_main:
        params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        print(
            f"{args.model} ({params:,} parameters) on {mx.default_device()}, {n_train} images"
            f"{', augmented' if args.augment else ''}, world size {mesh.size}",
            flush=True,
        )
    accuracy, began = 0.0, time.perf_counter()

    def show(epoch: int, fraction: float) -> None:
        nonlocal accuracy
        accuracy, test_loss = evaluate(mesh, model, x_test, y_test)
        if mesh.is_main:
            mesh.report(epoch=epoch, epochs=args.epochs, test_accuracy=accuracy, test_loss=test_loss)
            print(
                f"epoch {epoch + fraction:.2f}/{args.epochs}  test accuracy {accuracy * 100:.2f}%  "
                f"test loss {test_loss:.4f}  {time.perf_counter() - began:.0f} s",
                flush=True,
            )

    for epoch in range(args.epochs):
        batches = mesh.batches(n_train, args.batch_size, epoch=epoch, seed=args.seed)
        for step, idx in enumerate(batches):
            if len(idx) == 0:
                loss, grads = mx.array(0.0), zero_grads
            else:
                xb = x_train[idx]
                if args.augment:
                    xb = augment(xb, np.random.default_rng([args.seed, epoch, step, mesh.rank]))
                loss, grads = loss_and_grad(mx.array(xb), mx.array(y_train[idx]))
            grads = mesh.allreduce(grads, weight=len(idx), wire_dtype=wire)
            apply_update(grads)
            mx.eval(model.parameters(), optimizer.state, loss)
            mesh.report(
                epoch=epoch,
                epochs=args.epochs,
                step=step,
                steps_per_epoch=steps_per_epoch,
                loss=loss.item(),
                samples=len(idx),
            )
            if (step + 1) % eval_every == 0 and step + 1 < steps_per_epoch:
                show(epoch, (step + 1) / steps_per_epoch)  # mid-epoch
        show(epoch, 1.0)  # every worker, each evaluating its share of the test set
    if mesh.is_main:
        print(
            f"final test accuracy: {accuracy * 100:.2f}% in {time.perf_counter() - began:.0f} s", flush=True
        )
    mesh.close()


if __name__ == "__main__":
    try:
        main()
    except meshtrain.UserError as exc:  # the dataset package missing, say: one line, no traceback
        raise SystemExit(f"fashion_mnist.py: {exc}") from None
