"""Prefill and decode rates of a model on this CPU for each dtype and thread count (issue 13: threads and dtype).

    python bench/threads_dtype.py [--model smollm2-135m-local] [--prompt 2000] [--decode 32]

Each cell loads the model in that dtype, sets torch's thread count, prefills a prompt into a fresh cache the
way a turn does (generate.prefill) and decodes greedily (generate.decode_step). The last line says whether
prefilling in fp32 and decoding in bf16 (two copies of the weights) would beat either dtype alone on the
same chat: one prompt of --prompt tokens and --decode tokens of reply.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from chatapp.engine import kvcache, load_model
from chatapp.engine.generate import decode_step, prefill


def measure(label: str, preset: str, threads: int, prompt: int, decode: int) -> dict:
    torch.set_num_threads(threads)
    loaded = load_model(label, preset)
    ids = [(i * 7919) % 20000 + 100 for i in range(prompt)]
    with torch.inference_mode():
        prefill(loaded.model, kvcache.new_cache(loaded.model.config), ids[:64])  # warm-up
        cache = kvcache.new_cache(loaded.model.config)
        start = time.perf_counter()
        logits = prefill(loaded.model, cache, ids)
        prefill_s = time.perf_counter() - start
        token = int(logits.argmax(-1))
        start = time.perf_counter()
        for _ in range(decode):
            token = int(decode_step(loaded.model, cache, token).argmax(-1))
        decode_s = time.perf_counter() - start
    return {
        "dtype": loaded.dtype,
        "threads": threads,
        "prefill_tok_s": prompt / prefill_s,
        "decode_tok_s": decode / decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-local")
    parser.add_argument("--prompt", type=int, default=2000)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    args = parser.parse_args()
    print(f"torch uses {torch.get_num_threads()} threads by default on this machine")
    rows = [
        measure(args.model, preset, int(threads), args.prompt, args.decode)
        for preset in ("fp32", "bf16")
        for threads in args.threads.split(",")
    ]
    for row in rows:
        print(json.dumps(row))
    best = {
        dtype: max((r for r in rows if r["dtype"] == dtype), key=lambda r: r["decode_tok_s"])
        for dtype in ("fp32", "bf16")
    }

    def chat_s(prefill_row, decode_row):
        return args.prompt / prefill_row["prefill_tok_s"] + args.decode / decode_row["decode_tok_s"]

    options = {
        "fp32": chat_s(best["fp32"], best["fp32"]),
        "bf16": chat_s(best["bf16"], best["bf16"]),
        "fp32 prefill + bf16 decode": chat_s(best["fp32"], best["bf16"]),
    }
    for name, seconds in options.items():
        print(f"{name}: {seconds:.2f} s for a {args.prompt}-token prompt and {args.decode} tokens of reply")
    print(f"fastest here: {min(options, key=options.get)}")


if __name__ == "__main__":
    main()
