"""The GPU check's worker steps: switching models frees memory, and a forced load that can't fit fails cleanly.

Both go through chatapp's worker. Switching runs Worker.load in this process (its load handler is a plain method;
the events travel over a real pipe), reading memory right after each unload it does. The out-of-memory step runs
the worker in its own process through WorkerClient, as the app does, and plays the app's part when a load fails:
chatapp.ui.backend.Backend (which needs textual, absent on the GPU machine) loads the previous model again.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from contextlib import contextmanager

from gpu_memory import TOLERANCE, free_after, rss, snapshot, used

GIB = 2**30
SWITCH_GOAL = "device memory after each unload within 100 MiB of the baseline before the first load"
OOM_GOAL = "one out-of-memory line from the worker, then the previous model back, answering, with its memory as before"
#: On CUDA the ballast leaves this much free: far less than the forced 8B needs, plenty for the small model.
ROOM = 4 * GIB
#: The forced load's preset. Not bf16: a bf16 model too big for the GPU is split over the GPU and CPU RAM (the
#: planner's slow choice), so it loads, as the first H200 run found. fp32 has no such split.
FORCED = "fp32"


class _Events:
    """Events from the worker's pipe, read on a thread as the app's reader does."""

    def __init__(self, conn):
        self.queue: queue.Queue = queue.Queue()
        self.conn = conn
        threading.Thread(target=self._read, daemon=True, name="gpu-check-events").start()

    def _read(self) -> None:
        while True:
            try:
                self.queue.put(self.conn.recv())
            except (EOFError, OSError):
                return


def wait_for(events: queue.Queue, kinds: tuple, timeout: float):
    """The first event of one of `kinds` (the status lines before it are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(event, kinds):
            return event
    raise TimeoutError(f"no {' or '.join(k.__name__ for k in kinds)} from the worker within {timeout:.0f} s")


def prompt(count: int) -> str:
    """A user message of `count` letters (one token each with the check's tokenizer)."""
    import random

    rng = random.Random(count)
    return "".join(rng.choice("abcdefghij") for _ in range(count))


# -- 5. switching frees memory ---------------------------------------------------------------------------------


def switching(ctx, record: dict) -> None:
    """bf16 -> nf4 -> bf16 of the 8B through Worker.load, each with a turn, memory read right after each unload."""
    from chatapp import protocol as p
    from chatapp.engine.worker import Worker
    from chatapp.sampling import SamplingParams

    rows = record["rows"] = []
    cuda = ctx.device.startswith("cuda")

    class MeasuredWorker(Worker):
        def unload(self) -> None:
            what = self.loaded.preset if self.loaded is not None else None
            super().unload()
            if what is not None:
                rows.append(_row(f"unloaded {what}", snapshot(ctx.device), base, judged=True))

    folder = ctx.checkpoints.get("llama-3.1-8b")
    free_after(ctx)
    base = snapshot(ctx.device)
    rows.append(_row("baseline: nothing loaded", base, base))
    ours, theirs = multiprocessing.Pipe()
    events = _Events(ours)
    worker = MeasuredWorker(theirs, ctx.settings)
    # One token a turn: the turn's KV cache is made and held, and no decode step compiles (the decode step does).
    params = SamplingParams(temperature=0.0, max_new_tokens=1)
    try:
        for turn, preset in enumerate(("bf16", "nf4", "bf16"), 1):
            ctx.say(f"switch: loading {preset}")
            worker.handle(p.Load(str(folder), preset, context_tokens=2 * ctx.sizes.switch_prompt))
            answer = wait_for(events.queue, (p.Loaded, p.Error), 60)
            if isinstance(answer, p.Error):
                raise RuntimeError(f"loading {preset}: {answer.message}")
            worker.handle(p.Generate(turn, turn, [("user", prompt(ctx.sizes.switch_prompt))], params))
            done = wait_for(events.queue, (p.Finished, p.Error), 60)
            if isinstance(done, p.Error):
                raise RuntimeError(f"a turn on {preset}: {done.message}")
            rows.append(_row(f"loaded {preset}, one turn", snapshot(ctx.device), base))
        worker.unload()  # what the next switch, or a shutdown, does first
    finally:
        worker.unload()  # a no-op after the last one above; after a failure, it frees what was loaded
        theirs.close()
        ours.close()
    judged = [row["back_to_baseline"] for row in rows if "back_to_baseline" in row]
    record["goal_met"] = (all(judged) if judged else None) if cuda else None
    if not cuda:
        record["notes"] = ["dry run: process RSS, which the allocator need not give back; no verdict"]


def _row(phase: str, now: dict, base: dict, judged: bool = False) -> dict:
    key = "used_bytes" if "used_bytes" in now else "rss_bytes"
    row = {"phase": phase, **now, "above_baseline_bytes": now[key] - base[key]}
    if judged:
        row["back_to_baseline"] = row["above_baseline_bytes"] <= TOLERANCE
    return row


# -- 6. a forced load that can't fit ---------------------------------------------------------------------------


def is_oom(text: str) -> bool:
    """Whether an error line says memory ran out: CUDA's words, or the CPU's (a dry run's stand-in)."""
    lowered = text.lower()
    return any(
        words in lowered for words in ("out of memory", "out of gpu memory", "cannot allocate memory", "memoryerror")
    )


@contextmanager
def squeeze(ctx, pid: int):
    """Fill the device but ROOM (CUDA: a ballast tensor in this process, which the worker's planner sees in NVML's
    free memory), or, on a CPU, cap the worker's address space at its size now, so its next big allocation fails.
    Yields (what was done, the ballast's bytes)."""
    if ctx.device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        size = max(0, free - ROOM)
        ballast = torch.empty(size, dtype=torch.uint8, device=ctx.device)
        try:
            yield f"a {size / GIB:.1f} GiB ballast in the parent left {ROOM / GIB:.0f} GiB free", size
        finally:
            del ballast
            torch.cuda.empty_cache()
        return
    import resource

    size = next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith("VmSize:"))
    old = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (size, old[1]))
    try:
        yield "the worker's address space capped at its size (RLIMIT_AS): the CPU's stand-in for a full GPU", 0
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, old)


def oom(ctx, record: dict) -> None:
    """Small model loaded; the device filled; a forced fp32 8B load; the app's answer to the error: load the small
    model again and ask it something. Memory is the worker's: the device's in use less the baseline and ballast."""
    from chatapp import protocol as p
    from chatapp.sampling import SamplingParams
    from chatapp.worker_client import WorkerClient

    small, big = ctx.checkpoints.get("smollm2-135m"), ctx.checkpoints.get("llama-3.1-8b")
    cuda = ctx.device.startswith("cuda")
    rows = record["rows"] = []
    events: queue.Queue = queue.Queue()
    client = WorkerClient(ctx.settings, events.put, log_path=ctx.scratch / "worker.log")
    free_after(ctx)
    base = used(ctx.device)

    def reading(phase: str, ballast: int = 0) -> dict:
        worker = used(ctx.device) - base - ballast if cuda else rss(client.pid)
        return {"phase": phase, "worker_bytes": worker}

    def load(folder, preset: str = "bf16", force: bool = False):
        request = p.Load(str(folder), preset, context_tokens=1024, force=force)
        client.send(request)
        return wait_for(events, (p.Loaded, p.Error, p.WorkerDied), 180)

    client.start()
    try:
        first = load(small)
        if not isinstance(first, p.Loaded):
            raise RuntimeError(f"the small model didn't load: {getattr(first, 'message', first)}")
        rows.append(reading("previous model loaded (smollm2-135m bf16)"))
        with squeeze(ctx, client.pid) as (how, ballast):
            record.update(squeeze=how, planner_refuses=_planner_refuses(ctx, big))
            ctx.say(f"oom: forcing the 8B in {FORCED} into what is left")
            answer = load(big, FORCED, force=True)
            rows.append(reading("after the failed load", ballast))
        message = getattr(answer, "message", None) or getattr(answer, "last_log_line", "")
        record.update(answered=type(answer).__name__, error_line=message, worker_alive=client.alive)
        record["out_of_memory"] = isinstance(answer, p.Error) and is_oom(message)
        record["one_line"] = isinstance(answer, p.Error) and "\n" not in message and len(message) < 400
        # The app's Backend, on a load's Error: load what was loaded before.
        back = load(small)
        record["previous_back"] = isinstance(back, p.Loaded)
        rows.append(reading("previous model back"))
        client.send(p.Generate(1, 1, [("user", prompt(16))], SamplingParams(temperature=0.0, max_new_tokens=1)))
        record["answers"] = isinstance(wait_for(events, (p.Finished, p.Error), 60), p.Finished)
    finally:
        client.stop()
    rows.append(reading("worker stopped"))
    record["memory_as_before"] = abs(rows[2]["worker_bytes"] - rows[0]["worker_bytes"]) <= TOLERANCE
    checks = ("out_of_memory", "one_line", "previous_back", "answers", "memory_as_before")
    record["goal_met"] = all(record[check] for check in checks) if cuda else None
    if not cuda:
        record["notes"] = ["dry run: worker RSS; the checks ran, the verdict is the GPU's"]


def _planner_refuses(ctx, folder) -> bool:
    """Whether the planner, seeing the device as it is now, refuses the forced load (the user forced it past that)."""
    from chatapp import planner
    from chatapp.engine.loader import detect_hardware
    from chatapp.facts import facts_from_folder

    plan = planner.choose(detect_hardware(ctx.device), facts_from_folder(folder), context=1024, preset=FORCED)
    return plan.choice is None
