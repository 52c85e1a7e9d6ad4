"""Where a decode step's time goes: torch.profiler's top operators at a few cache lengths (issue 13).

    python bench/profile_decode.py [--model smollm2-135m-local] [--preset fp32] [--contexts 100,6000]

For each length it prefills that many tokens into the app's cache (kvcache.new_cache), runs a few decode
steps to warm up, then profiles --steps steps of generate.decode_step and prints the operators by self
CPU time, with the step rate measured outside the profiler.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from chatapp.engine import kvcache, load_model
from chatapp.engine.generate import decode_step, prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-local")
    parser.add_argument("--preset", default="fp32")
    parser.add_argument("--contexts", default="100,6000")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    loaded = load_model(args.model, args.preset)
    model = loaded.model
    print(f"{loaded.describe()}; torch threads {torch.get_num_threads()}")
    for context in (int(c) for c in args.contexts.split(",")):
        cache = kvcache.new_cache(model.config)
        with torch.inference_mode():
            prefill(model, cache, [(i * 7919) % 20000 + 100 for i in range(context)])
            for _ in range(4):
                decode_step(model, cache, 42)
            start = time.perf_counter()
            for _ in range(args.steps):
                decode_step(model, cache, 42)
            rate = args.steps / (time.perf_counter() - start)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    decode_step(model, cache, 42)
        print(f"\n== {context} tokens of context: {rate:.2f} tok/s ({1000 / rate:.1f} ms a step)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
