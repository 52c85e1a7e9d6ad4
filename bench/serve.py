"""The scripted 10-turn chat of `chatapp bench`, through the `openai` client, against any OpenAI-compatible server.

    python bench/serve.py URL [--model ID] [--api-key KEY] [--turns 10 --user-tokens 110 --max-new-tokens 24]
                              [--runs 1] [--json]

URL is the server's base URL, e.g. http://127.0.0.1:8000/v1 for `chatapp serve` or `transformers serve`. Each
turn sends the whole conversation, as an OpenAI client does, greedy (temperature 0), streaming with
`stream_options.include_usage`. It prints, per turn: time to the first streamed token (TTFT, from the request to
the first chunk with text), the turn's time, prompt tokens and the server's `usage.prompt_tokens_details.
cached_tokens` ("-" when the server reports none); then the whole chat's time. Run two servers one after the
other on the same box to compare them; absolute times drift between runs.

Each run is a new conversation: its first message starts with a tag of its own, so a server that keeps caches
across requests (as `chatapp serve` does, even across restarts) can't answer a run's turns from an earlier
run's. `--runs N` runs the chat N times and ends with each turn's median TTFT, which a one-off stall on a
shared box moves less than a single run.

The user messages are the bench's (`scripted_messages`), sized in tokens by the starter model's tokenizer
(`--tokenizer`, default the converted starter model), so the chat is the same whichever server answers.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time


def _tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        from chatapp.catalog import load_catalog
        from chatapp.config import load_settings
        from chatapp.engine.loader import materialize
        from chatapp.refs import parse_ref

        path = str(materialize(parse_ref("smollm2-135m-local", load_catalog()), load_settings()))
    return AutoTokenizer.from_pretrained(path)


def turn(client, model: str, messages: list[dict], max_new_tokens: int) -> dict:
    """One streamed, greedy reply: its text and what it took."""
    started = time.perf_counter()
    first, parts, usage = None, [], None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_new_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter()
                parts.append(choice.delta.content)
    ended = time.perf_counter()
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {
        "text": "".join(parts),
        "ttft_s": (first or ended) - started,
        "turn_s": ended - started,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "cached_tokens": getattr(details, "cached_tokens", None) if details else None,
    }


def run(
    url: str, model: str | None, api_key: str, turns: int, user_tokens: int, max_new_tokens: int, tok, tag: str = ""
) -> dict:
    """One chat; tag (if any) starts its first message, making it a conversation no earlier run had."""
    import openai

    from chatapp.engine.bench import scripted_messages

    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=600)
    model = model or client.models.list().data[0].id
    users = scripted_messages(tok, turns, user_tokens)
    if tag:
        users[0] = f"[{tag}] {users[0]}"
    messages: list[dict] = []
    rows = []
    started = time.perf_counter()
    for text in users:
        messages.append({"role": "user", "content": text})
        row = turn(client, model, messages, max_new_tokens)
        messages.append({"role": "assistant", "content": row["text"]})
        rows.append(row)
    total = time.perf_counter() - started
    return {"url": url, "model": model, "tag": tag, "turns": rows, "total_s": total}


def medians(results: list[dict]) -> dict:
    """Each turn's median TTFT over the runs, and the median whole-chat time."""
    turns = zip(*(result["turns"] for result in results), strict=True)
    return {
        "ttft_s": [statistics.median(row["ttft_s"] for row in rows) for rows in turns],
        "total_s": statistics.median(result["total_s"] for result in results),
    }


def table(result: dict) -> str:
    lines = [f"{result['url']} ({result['model']})", "turn   ttft_s   turn_s   prompt   cached"]
    for i, row in enumerate(result["turns"], 1):
        cached = "-" if row["cached_tokens"] is None else f"{row['cached_tokens']:,}"
        prompt = "-" if row["prompt_tokens"] is None else f"{row['prompt_tokens']:,}"
        lines.append(f"{i:>4} {row['ttft_s']:>8.3f} {row['turn_s']:>8.3f} {prompt:>8} {cached:>8}")
    rows = result["turns"]
    lines.append(f"total {result['total_s']:.2f} s; turn-{len(rows)} TTFT / turn-2 TTFT = {ratio(rows):.2f}")
    return "\n".join(lines)


def ratio(rows: list[dict]) -> float:
    return rows[-1]["ttft_s"] / rows[1]["ttft_s"] if len(rows) > 1 and rows[1]["ttft_s"] else float("nan")


def median_table(results: list[dict]) -> str:
    mid = medians(results)
    ttft = mid["ttft_s"]
    return (
        f"median of {len(results)} runs: TTFT per turn {' '.join(f'{t:.3f}' for t in ttft)}; "
        f"whole chat {mid['total_s']:.2f} s; turn-{len(ttft)} TTFT / turn-2 TTFT = "
        f"{ratio([{'ttft_s': t} for t in ttft]):.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="the model id to ask for (default: the first /v1/models lists)")
    parser.add_argument("--api-key", default="none", help="the server's key, if it wants one")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user-tokens", type=int, default=110)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--tokenizer", help="sizes the user messages (default: the converted starter model)")
    parser.add_argument("--runs", type=int, default=1, help="run the chat this many times, each a new one")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.turns < 1:
        parser.error("--runs and --turns must be at least 1")
    tok = _tokenizer(args.tokenizer)
    results = []
    for _ in range(args.runs):
        tag = secrets.token_hex(3)
        result = run(args.url, args.model, args.api_key, args.turns, args.user_tokens, args.max_new_tokens, tok, tag)
        results.append(result)
        if not args.json:
            print(table(result), flush=True)
    if args.json:
        print(json.dumps(results[0] if args.runs == 1 else {"runs": results, "median": medians(results)}))
    elif args.runs > 1:
        print(median_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
