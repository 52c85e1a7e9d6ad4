"""Decode rate on transformers' DynamicCache against chatapp's growing cache, in one process, alternated.

    python bench/cache_ab.py [--model smollm2-135m-local] [--preset fp32] [--contexts 100,2000,6000]

This box's speed drifts between runs, so the two caches are measured in the same process: each is
prefilled with the same tokens, then they take turns decoding --steps tokens, --repeats times.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from chatapp.engine import kvcache, load_model
from chatapp.engine.generate import decode_step, prefill


def rate(model, cache, steps: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            decode_step(model, cache, 42)
        start = time.perf_counter()
        for _ in range(steps):
            decode_step(model, cache, 42)
        return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-local")
    parser.add_argument("--preset", default="fp32")
    parser.add_argument("--contexts", default="100,2000,6000")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model(args.model, args.preset).model
    for context in (int(c) for c in args.contexts.split(",")):
        ids = [(i * 7919) % 20000 + 100 for i in range(context)]
        caches = {"dynamic": DynamicCache(config=model.config), "growing": kvcache.new_cache(model.config)}
        for cache in caches.values():
            with torch.inference_mode():
                prefill(model, cache, ids)
        rates = {name: [] for name in caches}
        for _ in range(args.repeats):
            for name, cache in caches.items():
                rates[name].append(rate(model, cache, args.steps))
        for name, found in rates.items():
            print(f"{context} tokens, {name}: " + " ".join(f"{r:.2f}" for r in found) + " tok/s")


if __name__ == "__main__":
    main()
