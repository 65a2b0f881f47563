"""Build a tiny random Llama-architecture model in the directory layout `mlx_lm.load` reads.

Nothing can be downloaded on an offline machine, so this makes a model to try
examples/lm_finetune.py with (and the tests use it): a byte-level BPE
tokenizer trained on your text with `tokenizers` (`tokenizer.json`,
`tokenizer_config.json`), a Llama from `mlx_lm.models.llama.ModelArgs` with
random weights (`model.safetensors`) and its `config.json`:

    python examples/tiny_llama.py /tmp/tiny-llama --text my_text.txt

Any real mlx-lm model directory (MLX safetensors + config.json + tokenizer
files, e.g. one converted with `mlx_lm.convert` on a machine with a network)
fine-tunes the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPECIAL = "<|endoftext|>"


def build(
    out: str | Path,
    text: str,
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tokenizer trained on `text` and a random Llama of that vocabulary to `out`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines() or [text], trainer)
    tokenizer.save(str(target / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL, "bos_token": SPECIAL}
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=hidden * 2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        rms_norm_eps=1e-5,
        vocab_size=tokenizer.get_vocab_size(),
        tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    mx.save_safetensors(
        str(target / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )
    fields = {k: v for k, v in vars(args).items() if v is not None and k != "layer_types"}
    (target / "config.json").write_text(json.dumps(fields, indent=2))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the model directory to create")
    parser.add_argument("--text", required=True, help="a UTF-8 text file to train the tokenizer on")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"tiny_llama: cannot read {args.text}: {exc}", file=sys.stderr)
        return 2
    try:
        where = build(args.out, text, vocab_size=args.vocab_size, hidden=args.hidden, layers=args.layers)
    except ImportError:
        print("tiny_llama: needs mlx-lm: pip install 'meshtrain[mlx-lm]'", file=sys.stderr)
        return 2
    print(f"a tiny Llama in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
