"""llama.cpp (llama-cpp-python) on the same chat as `chatapp bench`, on the same GGUF file, for a same-box ratio.

    python bench/llamacpp_chat.py [--turns 10 --user-tokens 110 --doc-tokens 0 --max-new-tokens 24] [--json]
    python bench/llamacpp_chat.py --with-chatapp     # chatapp bench, then llama.cpp, back to back, side by side

Run it with chatapp's Python. llama-cpp-python is not a chatapp dependency: it lives in a venv of its own
(`--llama-python`, default /work/llama-venv/bin/python, or $LLAMA_PYTHON), and this same file runs there as
the llama side (`--serve`), which imports nothing but llama_cpp.

Why two processes: the prompts must be the bench's to the token, and each turn's prompt holds the replies
before it, so they can't be written out in advance. chatapp's side (this process) makes the user messages
with `scripted_messages`, renders every turn with `render_ids` and the converted model's tokenizer, and turns
each reply back into text as the bench does; the llama side gets token ids on stdin and answers with the
reply's ids and timings on stdout, one JSON line each. llama.cpp never tokenizes or renders anything, so
both engines see identical prompts. The GGUF is the one chatapp converts for `smollm2-135m-local`.

The llama side keeps one `Llama` across the turns: its `generate` reuses the longest common token prefix
with what its KV cache holds and evaluates only the rest. `prefilled_tokens` is read from llama.cpp's own
counters (tokens it evaluated in the turn, less the reply's decode steps), not assumed from the prefix.
Timings: `ttft_s` from the call to the first token, `decode_tokens_per_s` over the tokens after it (as the
bench's), `total_s` the whole chat's wall time from this side, rendering included, as `cached_total_s`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-local"
DEFAULT_LLAMA_PYTHON = "/work/llama-venv/bin/python"


# The llama side: runs in the llama venv, imports llama_cpp only.


def _perf_evaluated(llm) -> int:
    import llama_cpp

    data = llama_cpp.llama_perf_context(llm.ctx)
    return data.n_p_eval + data.n_eval


def _answer(llm, request: dict) -> dict:
    """One reply, greedy, to the prompt ids in request, continuing from what the cache holds."""
    import llama_cpp

    prompt, stop, limit = request["ids"], set(request["stop"]), request["max_new_tokens"]
    llama_cpp.llama_perf_context_reset(llm.ctx)
    started = time.perf_counter()
    ids, times = [], []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        times.append(time.perf_counter())
        ids.append(token)
        if token in stop or len(ids) >= limit:
            break  # the last token is not evaluated, as in chatapp: the next prompt's prefix match covers it
    evaluated = _perf_evaluated(llm)
    return {
        "ids": ids,
        "prompt_tokens": len(prompt),
        "prefilled_tokens": evaluated - (len(ids) - 1),
        "generated_tokens": len(ids),
        "ttft_s": times[0] - started,
        "decode_tokens_per_s": (len(ids) - 1) / (times[-1] - times[0]) if len(ids) > 1 else 0.0,
        "cache_tokens": llm.n_tokens,
        "finish_reason": "stop" if ids[-1] in stop else "length",
        "engine_s": times[-1] - started,
    }


def serve(gguf: str, threads: int, n_ctx: int) -> None:
    """Answer one JSON request per stdin line with one JSON line on stdout, until stdin closes."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(f"error: {sys.executable} has no llama_cpp: pip install llama-cpp-python there") from None

    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - started
    # Warm-up, as the bench warms up torch, then an empty cache so turn 1 reuses nothing.
    warm = llm.tokenize(b"Hello", add_bos=False)
    for _token in itertools.islice(llm.generate(warm, top_k=1, temp=0.0), 4):
        pass
    llm.reset()
    hello = {"llama_cpp_version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}
    print(json.dumps({**hello, "load_s": load_s}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_answer(llm, json.loads(line))), flush=True)


# chatapp's side: runs in chatapp's venv.


def _chatapp_side(args):
    from chatapp.engine import load_model
    from chatapp.engine.bench import _reply_text, scripted_messages

    loaded = load_model(MODEL, args.preset)
    gguf = args.gguf or str(loaded.source.path)
    script = scripted_messages(loaded.tokenizer, args.turns, args.user_tokens, args.doc_tokens)
    loaded.model = None  # only the tokenizer and stop ids are needed here: free the weights

    def reply_text(ids):
        return _reply_text(loaded, ids)

    return loaded, gguf, script, reply_text


def run_llama(args, say) -> dict:
    """The scripted chat through llama.cpp: the bench's prompts, as ids, one turn after the other."""
    from chatapp.engine.session import Message, common_prefix_len, render_ids

    loaded, gguf, script, reply_text = _chatapp_side(args)
    command = [args.llama_python, str(Path(__file__).resolve()), "--serve", "--gguf", gguf]
    command += ["--threads", str(args.threads), "--ctx", str(args.ctx)]
    try:
        worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    except OSError as exc:
        raise SystemExit(f"error: cannot start the llama side with '{args.llama_python}': {exc.strerror}") from None
    hello = _read(worker)
    say(f"llama.cpp {hello['llama_cpp_version']} loaded {Path(gguf).name} in {hello['load_s']:.2f}s")
    messages, rows, total, held = [], [], 0.0, []
    stop = sorted(loaded.stop_token_ids)
    for turn, text in enumerate(script, 1):
        messages.append(Message("user", text))
        started = time.perf_counter()
        ids = render_ids(loaded.tokenizer, messages)
        worker.stdin.write(json.dumps({"ids": ids, "stop": stop, "max_new_tokens": args.max_new_tokens}) + "\n")
        worker.stdin.flush()
        row = _read(worker)
        total += time.perf_counter() - started
        reply = row.pop("ids")
        # What a reused cache must cost: the prompt past the common prefix (one token replayed if none is left).
        expected = max(len(ids) - common_prefix_len(ids, held), 1)
        if row["prefilled_tokens"] != expected:
            say(f"warning: llama.cpp evaluated {row['prefilled_tokens']} prompt tokens, the prefix leaves {expected}")
        held = ids + reply[:-1]  # the last token is sampled, never evaluated
        messages.append(Message("assistant", reply_text(reply)))
        rows.append({"turn": turn, **row})
        say(
            f"llama.cpp turn {turn}: prefilled {row['prefilled_tokens']}/{row['prompt_tokens']}, "
            f"ttft {row['ttft_s']:.2f}s, {row['decode_tokens_per_s']:.1f} tok/s"
        )
    worker.stdin.close()
    worker.wait()
    return {
        "engine": "llama.cpp",
        "llama_cpp_version": hello["llama_cpp_version"],
        "gguf": gguf,
        "threads": args.threads,
        "n_ctx": args.ctx,
        "system_info": hello["system_info"],
        "user_tokens": args.user_tokens,
        "doc_tokens": args.doc_tokens,
        "cached": rows,
        "total_s": total,
    }


def _read(worker) -> dict:
    line = worker.stdout.readline()
    if not line:
        worker.wait()
        raise SystemExit(f"error: the llama side stopped (exit status {worker.returncode}); its stderr is above")
    return json.loads(line)


def run_chatapp(args, say) -> dict:
    """`chatapp bench` on the same chat, in its own process, as a user runs it."""
    command = [sys.executable, "-c", "import sys; from chatapp.cli import main; sys.exit(main())", "bench"]
    command += ["--model", MODEL, "--doc-tokens", str(args.doc_tokens)]
    command += ["--preset", args.preset, "--turns", str(args.turns), "--user-tokens", str(args.user_tokens)]
    command += ["--max-new-tokens", str(args.max_new_tokens), "--json"]
    if args.speculative:
        command += ["--speculative", args.speculative]
    say("chatapp bench: " + " ".join(command[3:]))
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: chatapp bench failed (exit status {done.returncode}); its stderr is above")
    return json.loads(done.stdout)


def _span(rows: list[dict], key: str, first: int, fmt: str) -> str:
    if len(rows) < first:
        return "-"
    return f"{rows[first - 1][key]:{fmt}} → {rows[-1][key]:{fmt}}"


def format_table(llama: dict, chatapp: dict | None = None) -> str:
    """Whole chat, TTFT turn 2 → last, decode tok/s turn 1 → last; and chatapp/llama.cpp for the whole chat."""
    systems = []
    if chatapp is not None:
        label = f"chatapp {chatapp['preset']} ({chatapp['dtype']})"
        systems.append((label, chatapp["cached_total_s"], chatapp["cached"]))
    label = f"llama.cpp {llama['llama_cpp_version']} ({Path(llama['gguf']).name}, {llama['threads']} threads)"
    systems.append((label, llama["total_s"], llama["cached"]))
    width = max(len(name) for name, _, _ in systems)
    last = len(llama["cached"])
    lines = [f"{'system':<{width}} | whole chat | {f'TTFT turn 2 → {last}':>16} | decode tok/s turn 1 → {last}"]
    for name, total, rows in systems:
        lines.append(
            f"{name:<{width}} | {total:>8.1f} s | {_span(rows, 'ttft_s', 2, '.2f') + ' s':>16} | "
            f"{_span(rows, 'decode_tokens_per_s', 1, '.1f')}"
        )
    if chatapp is None:
        lines.append("turn | prompt | prefilled | ttft | tok/s")
        for r in llama["cached"]:
            lines.append(
                f"{r['turn']:>4} | {r['prompt_tokens']:>6} | {r['prefilled_tokens']:>9} | "
                f"{r['ttft_s']:.2f}s | {r['decode_tokens_per_s']:.1f}"
            )
    else:
        ratio = chatapp["cached_total_s"] / llama["total_s"]
        lines.append(f"whole chat, chatapp / llama.cpp: {ratio:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user-tokens", type=int, default=110)
    parser.add_argument("--doc-tokens", type=int, default=0, help="first message's size (default 0: all alike)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--preset", default="auto", help="chatapp's preset (its tokenizer is the same in all)")
    parser.add_argument("--speculative", choices=("ngram", "off"), help="passed to chatapp bench (default: its own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--llama-python", default=os.environ.get("LLAMA_PYTHON", DEFAULT_LLAMA_PYTHON))
    parser.add_argument("--with-chatapp", action="store_true", help="run chatapp bench first, then compare")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--serve", action="store_true", help="the llama side (run by the llama venv's Python)")
    parser.add_argument("--gguf", help="the GGUF file (default: the one chatapp ships for " + MODEL + ")")
    args = parser.parse_args()
    if args.serve:
        serve(args.gguf, args.threads, args.ctx)
        return

    def say(text):
        print(text, file=sys.stderr, flush=True)

    chatapp = run_chatapp(args, say) if args.with_chatapp else None
    llama = run_llama(args, say)
    if args.json:
        out = llama if chatapp is None else {"chatapp": chatapp, "llama_cpp": llama}
        if chatapp is not None:
            out["ratio_whole_chat"] = chatapp["cached_total_s"] / llama["total_s"]
        print(json.dumps(out))
    else:
        print(format_table(llama, chatapp))


if __name__ == "__main__":
    main()
