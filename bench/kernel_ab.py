"""Decode rates with each way a bf16 decode step can attend, in turns, in one process (issue 13).

    python bench/kernel_ab.py [--model smollm2-135m-local] [--contexts 100,6000] [--rounds 10] [--steps 8] [--alone]

The ways: `kernel` (chatapp's C kernel, decode_kernel), `products` (torch's bf16 matrix products), both from
cpu_attention.LONG tokens with SDPA below, as the app decodes, and `sdpa` (SDPA with packed heads at every
length). --long sets LONG for the first two (1 runs them at every length). One cache per
context is prefilled once; each round runs --steps steps of every way on every cache and rolls them back.
A shared box's speed drifts by tens of percent within minutes, so it prints medians and, per round, each
rate against the first context's kernel rate measured next to it. --alone times the attention calls alone
instead: the kernel and the products on random bf16 keys and values shaped as the model's, one buffer per
layer, at the last context, with the GB/s of keys and values each reads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chatapp.engine import cpu_attention, decode_kernel, kvcache, load_model
from chatapp.engine.generate import decode_step, prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-local")
    parser.add_argument("--contexts", default="100,6000")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--alone", action="store_true")
    parser.add_argument("--long", type=int, default=cpu_attention.LONG)
    args = parser.parse_args()
    loaded = load_model(args.model, "bf16")
    model, kernel = loaded.model, decode_kernel._function
    if kernel is None:
        raise SystemExit(f"no kernel on this machine: {[r for r in loaded.reasons if 'kernel' in r]}")
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.alone:
        alone(model.config, contexts[-1], args.rounds)
        return
    ways = {"kernel": (kernel, args.long), "products": (None, args.long), "sdpa": (None, 10**9)}
    caches = {}
    rates: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for context in contexts:
            caches[context] = kvcache.new_cache(model.config)
            prefill(model, caches[context], [(i * 7919) % 20000 + 100 for i in range(context)])
        for _ in range(args.rounds):
            for context in contexts:
                for way, (function, long) in ways.items():
                    decode_kernel._function, cpu_attention.LONG = function, long
                    for _ in range(2):
                        decode_step(model, caches[context], 42)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        decode_step(model, caches[context], 42)
                    rates.setdefault((context, way), []).append(args.steps / (time.perf_counter() - start))
                    kvcache.drop(caches[context], args.steps + 2)
    decode_kernel._function = kernel
    print(f"{loaded.describe()}; torch threads {torch.get_num_threads()}; {args.rounds} rounds of {args.steps} steps")
    base = rates[(contexts[0], "kernel")]
    for (context, way), values in rates.items():
        ratio = statistics.median(a / b for a, b in zip(values, base, strict=True))
        print(
            f"{context:>6} tokens  {way:<8}  {statistics.median(values):6.2f} tok/s  "
            f"{ratio:.3f}x the kernel at {contexts[0]}"
        )


def alone(config, length: int, rounds: int) -> None:
    """Median ms per step for the attention calls of every layer, kernel against products."""
    kv_heads, heads = config.num_key_value_heads, config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    room = kvcache._room(length)
    layers = [
        [torch.randn(1, kv_heads, room, dim, dtype=torch.bfloat16) for _ in range(2)]
        for _ in range(config.num_hidden_layers)
    ]
    query = torch.randn(1, kv_heads, heads // kv_heads, dim, dtype=torch.bfloat16)
    ways = {"kernel": decode_kernel.attend, "products": cpu_attention._products}
    times: dict[str, list[float]] = {way: [] for way in ways}
    with torch.inference_mode():
        for _ in range(rounds):
            for way, attend in ways.items():
                start = time.perf_counter()
                for keys, values in layers:
                    attend(query, keys, values, length, dim**-0.5)
                times[way].append(time.perf_counter() - start)
    read = 2 * config.num_hidden_layers * kv_heads * length * dim * 2
    for way, values in times.items():
        step = statistics.median(values)
        print(
            f"{length} tokens, {config.num_hidden_layers} layers alone: {way:<8} {step * 1e3:6.2f} ms a step, "
            f"{read / step / 1e9:5.1f} GB/s"
        )


if __name__ == "__main__":
    main()
