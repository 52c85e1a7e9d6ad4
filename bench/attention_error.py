"""How far each way of attending a bf16 decode step moves the logits, on the real model at 6k tokens (issue 13).

    python bench/attention_error.py [--model smollm2-135m-local] [--offset 0] [--context 6000] [--steps 32]

Prefills --context tokens of README.md (from token --offset), then teacher-forces --steps decode steps four
times: with attention computed in fp32 from the same bf16 queries, keys and values (the reference), with
chatapp's C kernel (decode_kernel), with torch's bf16 products (cpu_attention._products) and with SDPA. Prints
each way's mean absolute logit error against the reference and how often its top choice agrees.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AttentionInterface

from chatapp.engine import cpu_attention, decode_kernel, kvcache, load_model
from chatapp.engine.generate import forward, prefill


def fp32_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    groups = query.shape[1] // key.shape[1]
    keys, values = key.float().repeat_interleave(groups, 1), value.float().repeat_interleave(groups, 1)
    causal = query.shape[2] > 1 and attention_mask is None
    output = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys, values, attn_mask=attention_mask, is_causal=causal, scale=scaling
    )
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-local")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--context", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    loaded = load_model(args.model, "bf16")
    model, kernel = loaded.model, decode_kernel._function
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    ids = loaded.tokenizer(text)["input_ids"][args.offset : args.offset + args.context + args.steps]
    if len(ids) < args.context + args.steps:
        raise SystemExit(f"README.md has only {len(ids)} tokens from offset {args.offset}")

    def logits(way: str) -> torch.Tensor:
        cache = kvcache.new_cache(model.config)
        with torch.inference_mode():
            decode_kernel._function, cpu_attention.LONG = None, 1024
            prefill(model, cache, ids[: args.context])
            if way == "fp32":
                AttentionInterface.register("sdpa", fp32_attention)
            decode_kernel._function = kernel if way == "kernel" else None
            cpu_attention.LONG = 10**9 if way == "sdpa" else 1024
            try:
                return torch.cat([forward(model, cache, [token]) for token in ids[args.context :]]).float()
            finally:
                cpu_attention.install()
                decode_kernel._function, cpu_attention.LONG = kernel, 1024

    reference = logits("fp32")
    for way in ("kernel", "products", "sdpa"):
        if way == "kernel" and kernel is None:
            print("kernel    not built here")
            continue
        ours = logits(way)
        error = (ours - reference).abs().mean().item()
        agree = (ours.argmax(-1) == reference.argmax(-1)).sum().item()
        print(f"{way:<9} mean logit error {error:.4f}, top choice agrees on {agree}/{args.steps} steps")


if __name__ == "__main__":
    main()
