"""A random-weight model with the shape of a catalog entry, for timing where the real weights can't be fetched.

    python bench/shaped_model.py qwen2.5-0.5b OUT     # then: chatapp serve --model OUT; python bench/serve.py URL

How a step's time splits between the weights and attention depends on the shape alone: layers, hidden size,
heads, key/value heads, head size, the MLP's width. SmolLM2-135M, the offline starter model, is an extreme
one: 30 narrow layers of 9 heads, so attending to 1,400 cached tokens adds about half as much arithmetic per
new token as all its weights do, where Qwen2.5-0.5B's adds a sixth. This builds the entry's `architecture`
from models.toml with random weights, stored in bf16 as the real checkpoints are, and the starter model's
tokenizer and chat template (so its vocabulary, and with it the embeddings, is SmolLM2's 49,152 tokens, not
the entry's). Its replies are nonsense; their timing is the shape's.
"""

from __future__ import annotations

import argparse
import sys

#: Catalog name prefix -> transformers config class: the decoder-only families whose architecture table says
#: all their shape needs.
CONFIGS = {"qwen2.5": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig", "smollm2": "LlamaConfig"}


def build(name: str, out: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatapp.catalog import load_catalog
    from chatapp.config import load_settings
    from chatapp.engine.loader import materialize
    from chatapp.refs import parse_ref

    catalog = load_catalog()
    entry = catalog.get(name)
    config_class = next((c for prefix, c in CONFIGS.items() if name.startswith(prefix)), None)
    if entry is None or entry.architecture is None or config_class is None:
        known = ", ".join(k for k, e in catalog.items() if e.architecture and any(k.startswith(p) for p in CONFIGS))
        sys.exit(f"shaped_model: no shape for {name!r}; one of: {known}")
    shape = entry.architecture
    starter = materialize(parse_ref("smollm2-135m-local", catalog), load_settings())
    tokenizer = AutoTokenizer.from_pretrained(starter)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["attention_heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape.get("head_dim", shape["hidden_size"] // shape["attention_heads"]),
        tie_word_embeddings=shape.get("tied_embeddings", False),
        max_position_embeddings=entry.context_length or 8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {config_class} shaped as {name}, {params / 1e6:.0f}M parameters, random weights")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a catalog entry with an architecture table, e.g. qwen2.5-0.5b")
    parser.add_argument("out", help="the folder to write")
    args = parser.parse_args(argv)
    build(args.name, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
