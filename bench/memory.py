"""Planner estimates against what loading really costs, for the starter model in every preset on this machine.

Each preset runs in a fresh process: RSS after importing torch + transformers (the planner's CPU overhead),
then after loading (weights), then after two long messages (KV cache + activations of a whole first prefill
and of masked chunks).

    python bench/memory.py [--tokens 4096] [--presets fp32,bf16,fp16,int8,nf4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, resource
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
import torch, transformers
base = rss()
from chatapp.engine import ChatSession, load_model
from chatapp.engine.session import Message
from chatapp.hardware import detect_cpu
from chatapp.sampling import SamplingParams
from chatapp.facts import facts_from_folder
from chatapp import planner
preset, tokens = sys.argv[1], int(sys.argv[2])
loaded = load_model("smollm2-135m-local", preset)
after_load = rss()
session = ChatSession(loaded)
params = SamplingParams(max_new_tokens=1, temperature=0.0)
# Two long messages: the first prefills an empty cache, the second attends to it in masked chunks.
for text in ("word " * (tokens // 2 - 40), "more " * (tokens // 2 - 40)):
    *_, last = session.reply_to([*session.messages, Message("user", text)], params)
stats = last.stats
cache = session._cache
kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
after_prompt = rss()
# This process's own peak: ru_maxrss keeps the parent's through exec (3 GB under a whole pytest run).
peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]) * 1024
facts = facts_from_folder(loaded.folder)
native = detect_cpu().bf16_native
est = planner.estimate(facts, loaded.preset, stats.prompt_tokens, device_type="cpu", bf16_supported=native)
print(json.dumps({
    "preset": loaded.preset, "prompt_tokens": stats.prompt_tokens,
    "runtime_rss": base, "footprint": loaded.footprint_bytes, "load_rss_growth": after_load - base,
    "kv_cache": kv, "prompt_rss_growth": after_prompt - after_load, "peak_rss": peak,
    "est_weights": est.weights_bytes, "est_kv": est.kv_cache_bytes, "est_activations": est.activation_bytes,
    "est_overhead": est.overhead_bytes, "est_total": est.total_bytes,
}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--presets", default="fp32,bf16,fp16,int8,nf4")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, preset, str(args.tokens)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "MALLOC_ARENA_MAX": "2"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows))
        return
    mb = lambda n: f"{n / 1e6:,.0f}"  # noqa: E731
    print(f"prompt: {rows[0]['prompt_tokens']} tokens; MB; 'measured' = planner's matching number")
    print("preset | weights est / footprint | KV est / measured | total est / peak RSS | ratio")
    for r in rows:
        print(
            f"{r['preset']:<6} | {mb(r['est_weights']):>7} / {mb(r['footprint']):>7} | "
            f"{mb(r['est_kv']):>5} / {mb(r['kv_cache']):>5} | {mb(r['est_total']):>7} / {mb(r['peak_rss']):>7} | "
            f"{r['est_total'] / r['peak_rss']:.2f}"
        )


if __name__ == "__main__":
    main()
