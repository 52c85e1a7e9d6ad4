"""The GPU check's look at int8's device memory, which the first H200 run found ~7 GB above what torch had allocated
(Llama 8B: the process held 16.9 GB against 9.8 GB allocated; bf16 and nf4 held what they allocated).

Loading through bitsandbytes copies each bf16 weight back to the CPU and up again as fp16 before quantizing it
(transformers' Bnb8bitQuantize, Int8Params._quantize). The suspicion: those transient blocks stay in torch's cache,
fragmented between the int8 weights, where `empty_cache` can only give back whole free segments. With
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True the cache can unmap free pages inside a segment.

Each allocator setting runs in a child process (the setting is read once, when CUDA starts): load int8 with the
loader's own empty_cache held back, read torch's allocated and reserved bytes and the driver's count; empty the
cache (what the loader does now); read again; a 1k-token turn; read again; the worker's trim after a turn; read
again. The expandable case then runs the small
model's compiled static decode, since the app can only use that setting if CUDA graphs still work under it.

    python bench/gpu_alloc.py --child '{"folder": ..., "small": ..., "scratch": ..., "device": "cuda", "graphs": true}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ALLOC_GOAL = "int8's device memory after a load: allocated, cached, and the driver's count, per allocator setting"
SETTINGS = (("default", ""), ("expandable segments", "expandable_segments:True"))
#: The child's readings are on its last line of output, after this.
MARK = "gpu-alloc: "


def alloc(ctx, record: dict) -> None:
    from gpu_memory import free_after

    folder, small = ctx.checkpoints.get("llama-3.1-8b"), ctx.checkpoints.get("smollm2-135m")
    free_after(ctx)
    rows = record["rows"] = []
    checks = record["graphs_under_expandable_segments"] = []
    for name, setting in SETTINGS:
        if ctx.left() < 40:
            rows.append({"allocator": name, "phase": "skipped: out of time"})
            continue
        args = {"folder": str(folder), "small": str(small), "scratch": str(ctx.scratch), "device": ctx.device}
        args["graphs"] = bool(setting)
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": setting}
        if not setting:
            env.pop("PYTORCH_CUDA_ALLOC_CONF")
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=max(10, ctx.left() - 5),
        )
        found = [line[len(MARK) :] for line in done.stdout.splitlines() if line.startswith(MARK)]
        if done.returncode or not found:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append({"allocator": name, "phase": f"failed (exit {done.returncode}): {tail[0][:200]}"})
            continue
        result = json.loads(found[-1])
        rows += [{"allocator": name, **row} for row in result["rows"]]
        if result.get("graphs"):
            checks.append({"allocator": name, **result["graphs"]})
    if not ctx.device.startswith("cuda"):
        record["notes"] = ["dry run: the process's RSS in place of device memory; no verdict"]


def child(args: dict) -> dict:
    """In its own process: the readings (see the module doc)."""
    import torch
    from gpu_memory import nvml_used, scratch_settings, snapshot

    from chatapp.engine import ChatSession, load_model
    from chatapp.engine.bench import cached_turn
    from chatapp.engine.session import Message

    cuda = args["device"].startswith("cuda")
    base = nvml_used() if cuda else None
    settings = scratch_settings(Path(args["scratch"]))

    def reading(phase: str) -> dict:
        now = snapshot(args["device"])
        if not cuda:
            return {"phase": phase, "process_bytes": now["rss_bytes"]}
        return {
            "phase": phase,
            "allocated_bytes": now["allocated_bytes"],
            "reserved_bytes": now["reserved_bytes"],
            "process_bytes": now["used_bytes"] - base if base is not None else None,
        }

    import gpu_models

    rows = []
    emptied = torch.cuda.empty_cache
    torch.cuda.empty_cache = lambda: None  # the loader's own, held back to see what loading leaves
    try:
        loaded = load_model(args["folder"], "int8", settings=settings, device=args["device"], context=2048)
    finally:
        torch.cuda.empty_cache = emptied
    rows.append(reading("int8 loaded, cache not emptied"))
    if cuda:
        torch.cuda.empty_cache()
    rows.append(reading("after empty_cache (the loader's)"))
    session = ChatSession(loaded, speculative="off", decode="dynamic")
    cached_turn(session, [Message("user", gpu_models.user_message(loaded.tokenizer, 1024))], 16)
    rows.append(reading("after a 1k-token turn"))
    from chatapp.engine.worker import _trim_device_cache

    _trim_device_cache()
    rows.append(reading("after the worker's trim"))
    result: dict = {"rows": rows}
    if args.get("graphs"):
        del session, loaded
        result["graphs"] = _graphs(args, settings)
    return result


def _graphs(args: dict, settings) -> dict:
    """The small model's static decode, compiled where CUDA is: whether it compiled without skipping CUDA graphs,
    and whether its replies equal the eager dynamic path's (fp32)."""
    import gc

    import torch
    from torch._dynamo.utils import counters

    from chatapp.engine import ChatSession, load_model
    from chatapp.engine.bench import cached_turn
    from chatapp.engine.session import Message

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    loaded = load_model(args["small"], "fp32", settings=settings, device=args["device"])
    message = [Message("user", "abcdefghij" * 20)]
    replies = {}
    for path in ("dynamic", "static"):
        session = ChatSession(loaded, speculative="off", decode=path)
        replies[path] = [cached_turn(session, message, 16)[0] for _ in range(2)]
    return {
        "static_step": "compiled" if loaded.compiled_step not in (None, loaded.model) else "eager",
        "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
        "same_replies_as_eager": replies["dynamic"] == replies["static"],
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        print(MARK + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit(__doc__)
