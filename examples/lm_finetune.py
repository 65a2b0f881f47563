"""Fine-tune an mlx-lm model from a local directory on your text, with LoRA or fully, over the mesh.

    python examples/lm_finetune.py --model DIR --data text.txt                 # alone
    meshtrain run --local 2 examples/lm_finetune.py --model /abs/DIR --data /abs/text.txt
    meshtrain run --data work examples/lm_finetune.py --model model --data text.txt   # any mesh

`--model DIR` is what `mlx_lm.load` reads (config.json, MLX safetensors,
tokenizer files; no hub download). `--data` is a text file, a directory of
`*.txt` files or a `.jsonl` of {"text": ...} lines; without it the script
uses `mesh.data_path`. A relative path that does not exist where the worker
runs is looked up in the data `meshtrain run --data` shipped, so one
`--data work` directory holding the model and the text reaches every node.

LoRA (the default) freezes the model and adds mlx-lm's LoRA layers
(`mlx_lm.tuner.utils.linear_to_lora_layers`) to the last `--lora-layers`
blocks; only they train and only their gradients cross the mesh. `--full`
trains every weight. Each step is data-parallel: every worker its slice of
the global batch of token windows (`mesh.batches`), gradients averaged by
`mesh.allreduce`, AdamW with warm-up and cosine decay. It is elastic like
every meshtrain job (workers may come and go; `--checkpoint-every` works).

At the end the main worker saves what mlx-lm loads back: LoRA adapters
(`adapters.safetensors` + `adapter_config.json`, for
`mlx_lm.load(DIR, adapter_path=SAVE)`), or with `--full` a whole model
directory (`mlx_lm.load(SAVE)`), in `--save` (default: the job's output
directory). It reports `loss` every step and `val_loss`/`perplexity` at each
evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

import meshtrain


def fail(message: str) -> None:
    """One line on stderr and exit status 2: a bad input is never a traceback."""
    print(f"lm_finetune: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def resolve(given: str | None, mesh: meshtrain.Mesh, what: str) -> Path:
    """`given` as it is if it exists here, else inside the data `meshtrain run --data` shipped."""
    shipped = mesh.data_path
    if given is None:
        if shipped is None:
            fail(f"no {what}: pass --{what} PATH (or `meshtrain run --data PATH ...`)")
        return shipped  # type: ignore[return-value]
    path = Path(given).expanduser()
    if path.exists() or path.is_absolute() or shipped is None:
        return path
    inside = (shipped if shipped.is_dir() else shipped.parent) / path
    return inside if inside.exists() else path


def read_texts(path: Path, validation: float) -> tuple[str, str]:
    """(training text, validation text) of a .txt file, a directory of .txt files, or a .jsonl."""
    from meshtrain.data.files import text_files
    from meshtrain.errors import UserError

    if path.suffix == ".jsonl" and path.is_file():
        try:
            rows = [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
            texts = [str(r["text"]) for r in rows]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            fail(f"{path}: want one JSON object with a 'text' field a line ({exc.__class__.__name__}: {exc})")
        cut = max(1, int(len(texts) * (1 - validation))) if len(texts) > 1 else len(texts)
        return "\n".join(texts[:cut]), "\n".join(texts[cut:] or texts[-1:])
    try:
        corpus = text_files(path, validation=validation)
    except UserError as exc:
        fail(str(exc))
    return corpus.train, corpus.validation


def windows(ids: np.ndarray, block: int) -> np.ndarray:
    """Non-overlapping (block + 1)-token windows: inputs are [:-1], targets [1:]."""
    n = (len(ids) - 1) // block
    return (
        np.stack([ids[i * block : i * block + block + 1] for i in range(n)])
        if n
        else np.zeros((0, block + 1))
    )


def load_model(directory: Path) -> tuple[nn.Module, Any]:
    if not directory.is_dir():
        fail(f"--model {directory}: no such directory")
    if not (directory / "config.json").is_file():
        fail(f"--model {directory}: no config.json there (not an mlx-lm model directory)")
    try:
        import mlx_lm
    except ImportError:
        fail("mlx-lm is not installed: pip install 'meshtrain[mlx-lm]'")
    try:
        model, tokenizer = mlx_lm.load(str(directory))
    except Exception as exc:  # noqa: BLE001 - a broken model directory is one line
        fail(
            f"--model {directory}: mlx_lm.load failed ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
        )
    return model, tokenizer


def add_lora(model: nn.Module, layers: int, rank: int, scale: float) -> dict[str, Any]:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}  # no dropout: replicas stay identical
    n = min(layers, len(model.layers))
    linear_to_lora_layers(model, n, params)
    return {"fine_tune_type": "lora", "num_layers": n, "lora_parameters": params}


def save(target: Path, model: nn.Module, model_dir: Path, adapter: dict[str, Any] | None) -> None:
    """What mlx-lm loads back: LoRA adapters, or (full fine-tuning) a whole model directory."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    if adapter is not None:
        weights = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(str(target / "adapters.safetensors"), weights)
        (target / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
        return
    from mlx_lm.utils import save_model

    save_model(target, model)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json"):  # fmt: skip
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, target / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="an mlx-lm model directory (config.json + safetensors)"
    )
    parser.add_argument(
        "--data", help="text: a .txt file, a directory of .txt, or .jsonl (default mesh.data_path)"
    )
    parser.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    parser.add_argument("--lora-layers", type=int, default=16, help="blocks (from the last) that get LoRA")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--scale", type=float, default=20.0, help="LoRA scale (mlx-lm's default)")
    parser.add_argument("--steps", type=int, default=200, help="global steps to train")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, in windows")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per window")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (1e-4 LoRA, 2e-5 full)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (and at the end)")
    parser.add_argument("--eval-windows", type=int, default=64, help="validation windows per evaluation")
    parser.add_argument("--validation", type=float, default=0.1, help="fraction of the text held out")
    parser.add_argument("--save", help="where to save the adapters (or model); default the job's output dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wire", choices=("bf16", "fp32"), default="bf16", help="gradients on the wire")
    args = parser.parse_args()

    mesh = meshtrain.init()
    model_dir = resolve(args.model, mesh, "model")
    data = resolve(args.data, mesh, "data")
    model, tokenizer = load_model(model_dir)
    train_text, val_text = read_texts(data, args.validation)
    train = windows(np.asarray(tokenizer.encode(train_text), dtype=np.int32), args.block_size)
    val = windows(np.asarray(tokenizer.encode(val_text), dtype=np.int32), args.block_size)[
        : args.eval_windows
    ]
    if len(train) == 0 or len(val) == 0:
        fail(f"{data}: too little text for windows of {args.block_size} tokens (try a smaller --block-size)")

    adapter = None if args.full else add_lora(model, args.lora_layers, args.rank, args.scale)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    peak = args.lr if args.lr is not None else (2e-5 if args.full else 1e-4)
    warmup = max(1, min(args.warmup, args.steps))
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(peak / warmup, peak, warmup),
            optim.cosine_decay(peak, max(1, args.steps - warmup)),
        ],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)

    def loss_fn(m: nn.Module, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(m(x), y).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    mesh.register(model, optimizer)
    zero_grads = tree_map(mx.zeros_like, model.trainable_parameters())
    wire = "float32" if args.wire == "fp32" else "auto"

    def evaluate() -> float:
        def sums(ix: np.ndarray) -> dict[str, float]:
            if len(ix) == 0:
                return {"loss_sum": 0.0, "count": 0.0}
            w = mx.array(val[ix])
            logits = model(w[:, :-1])
            loss = nn.losses.cross_entropy(logits, w[:, 1:]).mean(axis=1).sum()
            return {"loss_sum": loss.item(), "count": float(len(ix))}

        s = mesh.evaluate(len(val), sums)
        return s["loss_sum"] / s["count"] if s["count"] else math.nan

    if mesh.is_main:
        kind = "full fine-tuning" if args.full else f"LoRA rank {args.rank} on {adapter['num_layers']} blocks"
        shape = f"{len(train):,} training windows of {args.block_size} tokens, {len(val)} validation"
        print(f"{model_dir.name}: {total:,} parameters, {trainable:,} trained ({kind}); {shape}", flush=True)
    steps_per_epoch = -(-len(train) // args.batch_size)
    epochs = -(-args.steps // steps_per_epoch)
    first_val = evaluate()
    mesh.report(epoch=0, epochs=epochs, val_loss=first_val, perplexity=math.exp(min(first_val, 50)))
    if mesh.is_main:
        print(f"validation loss before: {first_val:.4f}", flush=True)
    started, tokens = time.perf_counter(), 0
    last_val, done = first_val, mesh.step
    for epoch in range(epochs):
        if done >= args.steps:
            break
        for idx in mesh.batches(len(train), args.batch_size, epoch=epoch, seed=args.seed):
            done = mesh.step + 1  # the global step this batch makes (mesh.step: those committed before it)
            if len(idx) == 0:  # more workers than windows in this batch: take part with nothing
                loss, grads = mx.array(0.0), zero_grads
            else:
                w = mx.array(train[idx])
                loss, grads = loss_and_grad(model, w[:, :-1], w[:, 1:])
            grads = mesh.allreduce(grads, weight=len(idx), wire_dtype=wire)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss)
            tokens += len(idx) * args.block_size
            step = done
            rate = tokens / (time.perf_counter() - started)
            mesh.report(epoch=epoch, epochs=epochs, step=(step - 1) % steps_per_epoch,
                        steps_per_epoch=steps_per_epoch, loss=loss, samples=len(idx),
                        lr=float(schedule(step)), tokens_per_s=rate)  # fmt: skip
            if step % args.eval_every == 0 or step == args.steps:
                last_val = evaluate()
                mesh.report(
                    epoch=epoch, epochs=epochs, val_loss=last_val, perplexity=math.exp(min(last_val, 50))
                )
                if mesh.is_main:
                    print(
                        f"step {step}: train loss {loss.item():.4f}, validation loss {last_val:.4f}",
                        flush=True,
                    )
            if done >= args.steps:
                break
    if mesh.is_main:
        print(f"validation loss after: {last_val:.4f} (before: {first_val:.4f})", flush=True)
        target = Path(args.save) if args.save else mesh.output_dir / ("model" if args.full else "adapters")
        save(target, model, model_dir, adapter)
        how = (
            f"mlx_lm.load('{args.model}', adapter_path='{target}')" if adapter else f"mlx_lm.load('{target}')"
        )
        print(f"saved to {target}: {how}", flush=True)
    mesh.close()


if __name__ == "__main__":
    main()
