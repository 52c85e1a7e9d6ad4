"""The GPU, measured (issue 16): planner vs reality, decode speed, exactness, attention, switching and OOM on CUDA.

    python bench/gpu_check.py --out DIR [--dry-run] [--only STEP,...] [--budget-s 480]
        [--planner MODEL:PRESET,...] [--contexts TOKENS,...] [--variants read-back,ahead,copies]

The GPU machine has torch 2.11 but an older transformers and no bitsandbytes or platformdirs: bench/gpu_wheels.sh
fetches what it lacks into .whl/ here first (ignored by git; the run carries it: carry [".whl"]). The device run is
then one command, from the repository root (split at && to fit here; paste it as it is):

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 &&
  timeout 540 python3 bench/gpu_check.py --out $OUT

Models are random-weight checkpoints built from the real configs in bench/configs (bench/gpu_models.py) and loaded
through chatapp's own loader, sessions and worker. Each step is isolated: one that raises (CUDA out of memory, no
bitsandbytes) is recorded with its one-line error and the next runs. A step may use at most its share of the time
budget, and none starts or goes on past the budget: what is left is recorded as skipped. results.json and
results.md in DIR are rewritten after every step, so a run that is killed still leaves what it measured. Steps run
in the order steps() gives, the quick ones first, so that time running out costs the planner's last rows rather
than a whole check.

--dry-run runs the same steps on the CPU with each config shrunk to 2 layers, short prompts and few tokens, in about
a minute; what needs CUDA (driver memory, CUDA graphs, the ballast that fills the GPU) is left out, and says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

#: The Markdown shows bytes in MiB.
MIB = 2**20


class OutOfTime(BaseException):
    """Raised in the main thread when a step passes its share of the budget. A BaseException, so that code
    catching Exception (the worker's load turns any Exception into an Error event) lets it through."""


@dataclass(frozen=True)
class Sizes:
    """Token counts and buffer sizes: the issue's on a GPU, small ones for a dry run."""

    planner_prompt: int = 4096
    planner_new: int = 64
    decode_contexts: tuple[int, ...] = (1024, 8192)
    decode_new: int = 64
    decode_warm: int = 8
    attention_tokens: int = 8192
    attention_chunk: int = 2048
    exact_first: int = 400
    exact_turn: int = 40
    exact_new: int = 24
    exact_turns: int = 4
    switch_prompt: int = 256
    copy_bytes: int = 2**30


DRY_SIZES = Sizes(192, 4, (128, 512), 6, 2, 512, 128, 40, 12, 6, 2, 32, 64 * MIB)


@dataclass
class Context:
    """What every step gets: where to run, the sizes, the checkpoints, and the clock."""

    dry_run: bool
    device: str
    sizes: Sizes
    settings: object
    checkpoints: object
    scratch: Path
    deadline: float
    say: Callable[[str], None] = print
    #: The end of the running step's share of the budget (never after `deadline`).
    step_deadline: float = float("inf")
    #: Device memory in use (bytes, all processes) before this process touched CUDA, from NVML; None without it.
    used_before: int | None = None
    #: The planner step's rows to run ("model:preset"); empty: all of them.
    planner_rows: frozenset = frozenset()
    #: The graphs step's variants to run (gpu_graphs.VARIANTS' keys); empty: all of them.
    graph_variants: frozenset = frozenset()

    def left(self) -> float:
        return min(self.deadline, self.step_deadline) - time.monotonic()


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    goal: str
    run: Callable[[Context, dict], None]
    #: The most of the whole budget this step may take.
    share: float


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def free_memory(device: str) -> None:
    """Drop what a step left: compiled graphs and their CUDA graph pools, then every cached block."""
    gc.collect()
    if not device.startswith("cuda"):
        return
    import torch

    try:
        torch._dynamo.reset()
    except Exception as exc:  # a reset that fails leaves memory behind, which the next step then measures
        print(f"dynamo reset failed: {one_line(exc)}", flush=True)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _on_alarm(_signum, _frame):
    raise OutOfTime


def run_steps(steps: list[Step], ctx: Context, budget_s: float, write: Callable[[list[dict]], None], only=None):
    """Run each step under its share of the budget, recording ok, failed (with one line) or skipped; `write` gets
    the records after each step."""
    records: list[dict] = []
    before = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        _run_each(steps, ctx, budget_s, write, only, records)
    finally:
        signal.signal(signal.SIGALRM, before)
    return records


def _run_each(steps, ctx, budget_s, write, only, records) -> None:
    for step in steps:
        record = {"step": step.name, "title": step.title, "goal": step.goal, "goal_met": None}
        started = time.monotonic()
        left = ctx.deadline - started
        if only and step.name not in only:
            record.update(status="skipped", reason="not asked for (--only)")
        elif left < 1:
            record.update(status="skipped", reason=f"out of time: the {budget_s:.0f} s budget is spent")
        else:
            ctx.step_deadline = started + min(left, step.share * budget_s)
            ctx.say(f"step {step.name}: {step.title} (up to {ctx.left():.0f} s)")
            signal.setitimer(signal.ITIMER_REAL, max(ctx.left(), 0.01))
            try:
                try:
                    step.run(ctx, record)
                    record["status"] = "ok"
                finally:  # an alarm due just as the step ends may fire here: the except below still takes it
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except OutOfTime:
                record.update(status="failed", error=f"out of time: stopped after {time.monotonic() - started:.0f} s")
            except Exception as exc:  # any failure is this step's record, and the run goes on
                record.update(status="failed", error=one_line(exc))
            ctx.step_deadline = float("inf")
            free_memory(ctx.device)
        record["seconds"] = round(time.monotonic() - started, 1)
        ctx.say(f"step {step.name}: {record['status']} {record.get('error') or record.get('reason') or ''}")
        records.append(record)
        write(records)


# -- the report -------------------------------------------------------------------------------------------------


def _cell(key: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and (key.endswith("bytes") or key.endswith("bytes_per_s")):
        return f"{value / MIB:,.1f}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")


def _table(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    heads = [k.replace("_bytes", " MiB") for k in keys]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(k, row.get(k)) for k in keys) + " |" for row in rows]
    return lines


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [f"# GPU check: {meta.get('device_name', meta.get('device'))}", ""]
    lines += [f"- {key}: {_cell(key, value)}" for key, value in meta.items() if not isinstance(value, (dict, list))]
    for number, record in enumerate(records, 1):
        met = {True: "met", False: "NOT met", None: "no verdict"}[record.get("goal_met")]
        lines += ["", f"## {number}. {record['title']} ({record['step']}): {record['status']}, {record['seconds']} s"]
        lines += ["", f"Goal: {record['goal']} ({met})."]
        for key in ("error", "reason"):
            if record.get(key):
                lines += ["", f"{key.capitalize()}: {record[key]}"]
        for note in record.get("notes", []):
            lines += ["", f"- {note}"]
        summary = {k: v for k, v in record.items() if k not in _LAID_OUT and not isinstance(v, (dict, list))}
        if summary:
            lines += ["", *_table([summary])]
        if record.get("rows"):
            lines += ["", *_table(record["rows"])]
        for key, value in record.items():  # further tables (the graphs step's profile)
            if key != "rows" and isinstance(value, list) and value and isinstance(value[0], dict):
                lines += ["", f"{key.capitalize()}:", "", *_table(value)]
    return "\n".join(lines) + "\n"


_LAID_OUT = {"step", "title", "goal", "goal_met", "status", "seconds", "error", "reason", "notes", "rows"}


def write_report(out: Path, meta: dict, records: list[dict], finished: bool = False) -> None:
    """results.json and results.md, each replaced whole (written aside, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "steps": records, "finished": finished}
    for name, text in (
        ("results.json", json.dumps(data, indent=1, default=str)),
        ("results.md", markdown(meta, records)),
    ):
        aside = out / f".{name}.tmp"
        aside.write_text(text)
        aside.replace(out / name)


# -- the run ----------------------------------------------------------------------------------------------------


def steps() -> list[Step]:
    import gpu_alloc
    import gpu_graphs
    import gpu_memory
    import gpu_speed
    import gpu_worker

    return [
        Step("attention", "SDPA backends on an 8k prefill", gpu_speed.ATTENTION_GOAL, gpu_speed.attention, 0.08),
        Step("exactness", "Cache reuse vs a re-encode on CUDA", gpu_speed.EXACT_GOAL, gpu_speed.exactness, 0.2),
        Step("switch", "Switching frees memory", gpu_worker.SWITCH_GOAL, gpu_worker.switching, 0.15),
        Step("oom", "A forced load that can't fit", gpu_worker.OOM_GOAL, gpu_worker.oom, 0.15),
        Step("decode", "Decode speed against the bandwidth limit", gpu_speed.DECODE_GOAL, gpu_speed.decode, 0.35),
        # Not in a whole run's budget: these look into what the first run found (--only graphs,alloc).
        Step("graphs", "Inside the compiled decode step", gpu_graphs.GRAPHS_GOAL, gpu_graphs.graphs, 0.35),
        Step("planner", "Planner vs reality", gpu_memory.PLANNER_GOAL, gpu_memory.planner_vs_reality, 0.35),
        Step("alloc", "int8's device memory", gpu_alloc.ALLOC_GOAL, gpu_alloc.alloc, 0.2),
    ]


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny models")
    parser.add_argument("--only", default="", help="comma-separated steps to run (the others are recorded skipped)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time budget in seconds")
    parser.add_argument("--planner", default="", help="the planner step's rows only, as model:preset,...")
    parser.add_argument("--scratch", default=None, help="where checkpoints are written (default: /dev/shm or tmp)")
    parser.add_argument("--contexts", default="", help="the decode and graphs steps' contexts, as tokens,...")
    parser.add_argument("--variants", default="", help="the graphs step's variants only: read-back, ahead, copies")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_memory
    import gpu_models

    out = Path(args.out)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    known = {step.name for step in steps()}
    if only - known:
        parser.error(f"unknown step(s) {', '.join(sorted(only - known))}; the steps are {', '.join(sorted(known))}")
    import gpu_graphs

    variants = {name.strip() for name in args.variants.split(",") if name.strip()}
    keys = [key for key, *_ in gpu_graphs.VARIANTS]
    if variants - set(keys):
        parser.error(f"unknown variant(s) {', '.join(sorted(variants - set(keys)))}; they are {', '.join(keys)}")
    say = _sayer(started)
    used_before = gpu_memory.nvml_used()  # before this process makes its CUDA context
    device = "cpu" if args.dry_run else "cuda"
    meta = gpu_memory.describe_machine(device, args.dry_run)
    if not args.dry_run and not meta.get("cuda"):
        meta["error"] = "no CUDA device here: run with --dry-run, or on the GPU machine"
        write_report(out, meta, [], finished=True)
        say(meta["error"])
        return 2
    meta.update(budget_s=args.budget_s, only=sorted(only) or None, planner=args.planner or None)
    meta.update(variants=args.variants or None)
    meta["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    sizes = DRY_SIZES if args.dry_run else Sizes()
    if args.contexts:
        sizes = replace(sizes, decode_contexts=tuple(int(tokens) for tokens in args.contexts.split(",")))
    meta["sizes"] = asdict(sizes)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=gpu_models.pick_scratch(args.scratch, 48 * 2**30)))
    meta["scratch"] = str(scratch)
    checkpoints = gpu_models.Checkpoints(scratch / "models", device=device, dry_run=args.dry_run)
    ctx = Context(
        dry_run=args.dry_run,
        device=device,
        sizes=sizes,
        settings=gpu_memory.scratch_settings(scratch),
        checkpoints=checkpoints,
        scratch=scratch,
        deadline=started + args.budget_s,
        say=say,
        used_before=used_before,
        planner_rows=frozenset(row.strip() for row in args.planner.split(",") if row.strip()),
        graph_variants=frozenset(variants),
    )
    meta.update(gpu_memory.context_overhead(ctx))
    write_report(out, meta, [])
    try:
        records = run_steps(steps(), ctx, args.budget_s, lambda rs: write_report(out, meta, rs), only)
    finally:
        checkpoints.close()
        if (scratch / "worker.log").is_file():  # the oom step's worker: what it said, for the record
            shutil.copy(scratch / "worker.log", out / "worker.log")
        shutil.rmtree(scratch, ignore_errors=True)
    meta.update(checkpoint_build_s=checkpoints.build_s, total_s=round(time.monotonic() - started, 1))
    write_report(out, meta, records, finished=True)
    for record in records:
        met = {True: "goal met", False: "goal NOT met", None: "no verdict"}[record["goal_met"]]
        say(f"{record['step']}: {record['status']}, {met} {record.get('error') or record.get('reason') or ''}")
    say(f"done: {out / 'results.md'}")
    return 0


def _sayer(started: float) -> Callable[[str], None]:
    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    return say


if __name__ == "__main__":
    # The output's tail is what a device run returns: progress lines, not progress bars and per-call warnings.
    for name, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(name, value)
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 warns on every matmul
    raise SystemExit(main())
