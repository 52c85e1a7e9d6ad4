"""A CPU prefill's peak RSS and time with the C heap trimmed (engine/heap.py) and without: see MODES.

Each preset and mode runs in a fresh process (peak RSS only grows), in turns: load the starter model, then
prefill the same random tokens ROUNDS times, each on a new cache, as a chat's turns would.

    python bench/heap_ab.py [--presets bf16,nf4,int8] [--tokens 2048] [--rounds 3] [--turns 2] [--limit-mb N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

ROUNDS = 3
#: untrimmed: no trim at all; turns: the heap trimmed after the load and after each prefill, as the worker does after
#: each turn; watched: besides, after any decoder layer that leaves over heap.FREE_LIMIT free (what int8 loads get).
MODES = ("untrimmed", "turns", "watched")

CHILD = r"""
import json, sys, time
import torch
from chatapp.catalog import load_catalog
from chatapp.config import load_settings
from chatapp.engine import heap, kvcache, load_model
from chatapp.engine.generate import prefill
from chatapp.engine.loader import materialize
from chatapp.refs import parse_ref

preset, tokens, rounds, mode, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if limit:
    heap.FREE_LIMIT = int(limit) * 2**20
if mode != "watched":
    heap.watch = lambda model: 0
if mode == "untrimmed":
    heap.trim = lambda: None
settings = load_settings()
folder = materialize(parse_ref("smollm2-135m-local", load_catalog()), settings)
loaded = load_model(str(folder), preset, settings=settings)
hooked = sum(len(layer._forward_hooks) for layer in loaded.model.get_decoder().layers)
ids = torch.randint(100, loaded.model.config.vocab_size - 100, (tokens,), generator=torch.Generator().manual_seed(0))
seconds = []
with torch.inference_mode():
    for _ in range(rounds):
        cache = kvcache.new_cache(loaded.model.config)
        started = time.perf_counter()
        logits = prefill(loaded.model, cache, ids.tolist())
        seconds.append(round(time.perf_counter() - started, 2))
        del cache
        heap.trim()  # as the worker does after each turn
# This process's own peak: ru_maxrss keeps the parent's through exec (3 GB under a whole pytest run).
peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]) * 1024
top = logits.reshape(-1, logits.shape[-1])[-1].topk(5).indices.tolist()
print(json.dumps({"seconds": seconds, "peak_rss_mb": round(peak / 1e6), "hooked": hooked, "top": top}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="bf16,nf4,int8")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--turns", type=int, default=2, help="runs of each preset and setting, alternating")
    parser.add_argument("--limit-mb", default="", help="heap.FREE_LIMIT in MiB (default: the engine's)")
    args = parser.parse_args(argv)
    print(f"prefill of {args.tokens} tokens, {args.rounds} rounds a process; peak RSS in MB, seconds per round")
    for preset in args.presets.split(","):
        for _turn in range(args.turns):
            for mode in MODES:
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, preset, str(args.tokens), str(args.rounds), mode, args.limit_mb],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    print(f"{preset}: failed: {done.stderr.strip().splitlines()[-1]}")
                    return 1
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{preset:5} {mode:9} peak {result['peak_rss_mb']:>6,} MB   seconds {result['seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
