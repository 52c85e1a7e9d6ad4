"""`chatapp bench`: the same scripted conversation, greedy, through the cached session and a naive re-encode.

The naive path is what `transformers chat` does: a fresh `model.generate` over the whole rendered
conversation every turn. The output dict is a contract (see the README); keep its field names.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import DynamicCache

from ..protocol import TurnStats
from ..sampling import GREEDY
from . import kvcache
from .generate import ReplyText, StreamDecoder, decode_step, prefill, stream
from .loader import LoadedModel
from .session import ChatSession, Message, render_ids

_NOTES = (
    "The river town kept its market on the old stone bridge, where traders sold wool, salt and dried fish.",
    "Every spring the floods reached the lower streets, so the bakers built their ovens on the upper floors.",
    "A clockmaker named Ilse repaired the tower clock in 1871 and left a note inside the case for whoever came next.",
    "The railway arrived late, and the station was built a mile from the centre because the mayor owned the land.",
    "Children learned to swim in the mill pond, which was warmer than the river because of the waste heat.",
    "The library began as a single shelf in the inn, lent out by the landlord to travellers stuck by the snow.",
    "Glassworks on the east bank gave the town its colours: green bottles, blue lamps and amber window panes.",
    "In the dry summer of 1911 the river fell so low that the foundations of a Roman ford became visible.",
)
_QUESTIONS = (
    "Summarise these notes in one sentence.",
    "What would a visitor notice first?",
    "Which detail is the most surprising?",
    "What might the town look like today?",
    "Name one thing the bakers worried about.",
    "Why was the station far from the centre?",
    "What made the mill pond warm?",
    "How did the library begin?",
    "What colours came from the glassworks?",
    "What appeared in the summer of 1911?",
)


def _padded(tokenizer, head: str, tail: str, tokens: int, start: int) -> str:
    text, i = head, start
    while len(tokenizer(text + tail, add_special_tokens=False)["input_ids"]) < tokens:
        text += " " + _NOTES[i % len(_NOTES)]
        i += 1
    return text + tail


def scripted_messages(tokenizer, turns: int, user_tokens: int, doc_tokens: int = 0) -> list[str]:
    """Deterministic user messages: a document of doc_tokens in the first, then user_tokens each.

    The shape is "chat about a long text": the history is large from the start and each turn adds a
    little, which is where re-encoding the history hurts most.
    """
    messages = []
    for turn in range(turns):
        question = f"\nQuestion {turn + 1}: {_QUESTIONS[turn % len(_QUESTIONS)]}"
        size = doc_tokens if turn == 0 and doc_tokens else user_tokens
        messages.append(_padded(tokenizer, f"Notes, part {turn + 1}:", question, size, turn))
    return messages


#: Words the notes mention, one per question of the quote scenario.
_QUOTE_WORDS = ("river", "bridge", "spring", "clock", "station", "library", "glass", "summer", "mill", "snow")


def quote_messages(tokenizer, turns: int, doc_tokens: int) -> list[str]:
    """A document, then questions whose answers quote it: the chat prompt-lookup drafting is for."""
    messages = []
    for turn in range(turns):
        word = _QUOTE_WORDS[turn % len(_QUOTE_WORDS)]
        question = f"Quote, word for word, every sentence of the notes that mentions '{word}'."
        messages.append(_padded(tokenizer, "Notes:", "\n" + question, doc_tokens, 0) if turn == 0 else question)
    return messages


#: Decode rates are measured over at least this many tokens.
RATE_TOKENS = 48


def default_doc_tokens(context_length: int) -> int:
    """A document that fills most of the context but leaves room for the rest of the chat."""
    return min(int(context_length * 0.75), 6144)


class _TimingStreamer:
    """generate() hands the prompt, then each new token, to its streamer: note when each token came."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _generate(loaded: LoadedModel, prompt: list[int], max_new_tokens: int, **extra) -> tuple[list[int], list[float]]:
    """Greedy model.generate over prompt with our stop tokens: the new ids, and when each arrived."""
    model = loaded.model
    input_ids = torch.tensor([prompt], device=model.device)
    streamer = _TimingStreamer()
    stop = sorted(loaded.stop_token_ids)
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=stop,
            pad_token_id=stop[0],
            streamer=streamer,
            **extra,
        )
    return out[0, len(prompt) :].tolist(), streamer.times


def _rate(times: list[float]) -> float:
    """Tokens per second after the first token."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def naive_turn(loaded: LoadedModel, messages: list[Message], max_new_tokens: int) -> tuple[list[int], TurnStats]:
    """One reply from a fresh model.generate over the whole rendered conversation."""
    started = time.perf_counter()
    ids = render_ids(loaded.tokenizer, messages)
    new, times = _generate(loaded, ids, max_new_tokens)
    stats = TurnStats(
        prompt_tokens=len(ids),
        prefilled_tokens=len(ids),
        generated_tokens=len(new),
        ttft_s=times[0] - started if times else 0.0,
        decode_tokens_per_s=_rate(times),
        cache_tokens=len(ids) + len(new) - 1,
        finish_reason="stop" if new and new[-1] in loaded.stop_token_ids else "length",
    )
    return new, stats


def raw_decode_rate(loaded: LoadedModel, prompt: list[int], cache, tokens: int) -> float:
    """model.generate's decode rate continuing from a cache of the prompt."""
    _new, times = _generate(loaded, prompt, tokens, cache=cache, min_new_tokens=tokens)
    return _rate(times)


def _reply_text(loaded: LoadedModel, ids: list[int]) -> str:
    content = [t for t in ids if t not in loaded.stop_token_ids]
    return loaded.tokenizer.decode(content, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def cached_chat(
    loaded: LoadedModel, script: list[str], max_new_tokens: int, speculative: str, say: Callable[[str], None]
) -> tuple[ChatSession, list[dict], list[list[int]], float]:
    """The scripted chat through one session: the session, each turn's stats, its ids, and the wall time.

    speculative: ngram, off, or the name of loaded's draft model."""
    session = ChatSession(loaded, speculative=speculative if speculative in ("ngram", "off") else "draft")
    rows, replies, wall = [], [], 0.0
    for turn, text in enumerate(script, 1):
        t = time.perf_counter()
        ids, stats = cached_turn(session, [*session.messages, Message("user", text)], max_new_tokens)
        wall += time.perf_counter() - t
        rows.append({"turn": turn, **stats.as_dict()})
        replies.append(ids)
        say(
            f"cached turn {turn} (speculative {speculative}): prefilled {stats.prefilled_tokens}/"
            f"{stats.prompt_tokens}, ttft {stats.ttft_s:.2f}s, drafted {stats.drafted_tokens}, "
            f"accepted {stats.accepted_tokens}"
        )
    return session, rows, replies, wall


def chat_decode_rate(rows: list[dict]) -> float:
    """Tokens per second over every turn's decode (each turn's first token is the prefill's)."""
    tokens = sum(max(r["generated_tokens"] - 1, 0) for r in rows)
    seconds = sum((r["generated_tokens"] - 1) / r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"])
    return tokens / seconds if seconds else 0.0


def speculative_result(mode: str, rows: list[dict], replies: list[list[int]], plain: tuple | None) -> dict:
    """The bench's "speculative" entry; plain is (rows, replies) of the same chat without drafts, or None."""
    plain_rows, plain_replies = plain or (rows, replies)
    return {
        "mode": mode,
        "drafted": sum(r["drafted_tokens"] for r in rows),
        "accepted": sum(r["accepted_tokens"] for r in rows),
        "decode_tokens_per_s": chat_decode_rate(rows),
        "plain_decode_tokens_per_s": chat_decode_rate(plain_rows),
        "identical_outputs": replies == plain_replies,
    }


def cached_turn(session: ChatSession, messages: list[Message], max_new_tokens: int) -> tuple[list[int], TurnStats]:
    """One greedy reply through the session (the app's path): the sampled ids, and the stats."""
    ids, stats = [], None
    for response in session.reply_to(messages, replace(GREEDY, max_new_tokens=max_new_tokens)):
        if response.token is not None:
            ids.append(response.token)
        stats = response.stats or stats
    return ids, stats


def prompt_cache(loaded: LoadedModel, prompt: list[int]) -> DynamicCache:
    """A cache holding all of prompt but its last token, which each decode run feeds again for its logits."""
    cache = kvcache.new_cache(loaded.model.config)
    with torch.inference_mode():
        prefill(loaded.model, cache, prompt[:-1])
    return cache


def app_decode(loaded: LoadedModel, prompt: list[int], cache, tokens: int) -> tuple[list[int], list[float]]:
    """The app's decode loop (generate.stream), greedy, continuing from a copy of cache: exactly `tokens` ids
    (stop tokens masked, as generate's min_new_tokens does), and when each was sampled. Each token gets the
    work a turn does for it: streaming detokenization and the stop-string check."""
    model, cache = loaded.model, copy.deepcopy(cache)
    stop_ids = sorted(loaded.stop_token_ids)
    ids, times = [], []
    decoder, reply = StreamDecoder(loaded.tokenizer), ReplyText(loaded.stop_strings)

    def sample(logits):
        logits[:, stop_ids] = float("-inf")
        return int(logits.argmax(dim=-1).item())

    def stop(token):
        ids.append(token)
        times.append(time.perf_counter())
        reply.add(decoder.push(token))
        reply.take()
        return "length" if len(ids) >= tokens else None

    with torch.inference_mode():
        logits = prefill(model, cache, prompt[-1:])
        for _ in stream(logits, sample, lambda token: decode_step(model, cache, token), stop):
            pass
    return ids, times


def bare_decode(loaded: LoadedModel, prompt: list[int], cache, tokens: int) -> tuple[list[int], list[float]]:
    """The least a decode can do, continuing from a copy of cache: `model(...)` and an argmax per token, as
    app_decode masks stop tokens; the ids, and when each was sampled."""
    model, cache = loaded.model, copy.deepcopy(cache)
    stop_ids = sorted(loaded.stop_token_ids)
    ids, times = [], []
    token = torch.tensor([prompt[-1:]], device=model.device)
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
            logits[:, stop_ids] = float("-inf")
            token = logits.argmax(dim=-1, keepdim=True)
            ids.append(int(token.item()))
            times.append(time.perf_counter())
    return ids, times


def run_bench(
    loaded: LoadedModel,
    *,
    turns: int = 8,
    max_new_tokens: int = 24,
    user_tokens: int = 64,
    doc_tokens: int | None = None,
    repeats: int = 2,
    progress: Callable[[str], None] | None = None,
    restart: bool = False,
    speculative: str = "ngram",
    scenario: str = "chat",
) -> dict:
    say = progress or (lambda _text: None)
    if doc_tokens is None:
        doc_tokens = default_doc_tokens(loaded.context_length)
    if scenario == "quote":
        script = quote_messages(loaded.tokenizer, turns, doc_tokens)
    else:
        script = scripted_messages(loaded.tokenizer, turns, user_tokens, doc_tokens)
    naive_turn(loaded, [Message("user", "Hello")], 4)  # warm-up, so neither path pays first-call costs

    session, cached, cached_ids, cached_wall = cached_chat(loaded, script, max_new_tokens, speculative, say)
    plain = None
    if speculative != "off":
        _session, plain_rows, plain_ids, _wall = cached_chat(loaded, script, max_new_tokens, "off", say)
        plain = (plain_rows, plain_ids)

    messages: list[Message] = []
    naive, naive_ids, naive_wall = [], [], 0.0
    for turn, text in enumerate(script, 1):
        messages.append(Message("user", text))
        t = time.perf_counter()
        ids, stats = naive_turn(loaded, messages, max_new_tokens)
        naive_wall += time.perf_counter() - t
        messages.append(Message("assistant", _reply_text(loaded, ids)))
        naive.append({"turn": turn, **stats.as_dict()})
        naive_ids.append(ids)
        say(f"naive turn {turn}: prefilled {stats.prefilled_tokens}, ttft {stats.ttft_s:.2f}s")

    # Decode rates on the first prompt, over RATE_TOKENS tokens (stop tokens masked until then) so they are not
    # measured on a handful of tokens. One prefill serves every run: each continues from a copy of a cache of
    # the prompt but its last token, which it feeds again for its first logits.
    rate_tokens = max(max_new_tokens, RATE_TOKENS)
    prompt = render_ids(loaded.tokenizer, [Message("user", script[0])])
    cache = prompt_cache(loaded, prompt)
    app_rates, raw_rates, bare_rates = [], [], []
    for _ in range(repeats):
        app_rates.append(_rate(app_decode(loaded, prompt, cache, rate_tokens)[1]))
        bare_rates.append(_rate(bare_decode(loaded, prompt, cache, rate_tokens)[1]))
        raw_rates.append(raw_decode_rate(loaded, prompt, copy.deepcopy(cache), rate_tokens))
    result = {
        "model": loaded.source.label,
        "preset": loaded.preset,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "attn_implementation": loaded.attn_implementation,
        "scenario": scenario,
        "user_tokens": user_tokens,
        "doc_tokens": doc_tokens,
        "cached": cached,
        "naive": naive,
        "identical_outputs": cached_ids == naive_ids,
        "raw_generate_tok_s": max(raw_rates),
        "app_tok_s": max(app_rates),
        "bare_step_tok_s": max(bare_rates),
        "app_vs_bare": max(app_rates) / max(bare_rates) if max(bare_rates) else 0.0,
        "cached_total_s": cached_wall,
        "naive_total_s": naive_wall,
        "speedup": naive_wall / cached_wall if cached_wall else 0.0,
        "speculative": speculative_result(speculative, cached, cached_ids, plain),
    }
    if restart:
        say("restart: writing the snapshot as a quit would, then a fresh process answers the next message")
        result["restart"] = restart_result(loaded, session, max_new_tokens)
    return result


def restart_result(loaded: LoadedModel, session: ChatSession, max_new_tokens: int) -> dict:
    """The chat's next message after a restart, from a snapshot and cold, answered in a new process."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from .disk_cache import DiskCache
    from .session import common_prefix_len

    messages = [*session.messages, Message("user", "Thank you. Now answer in one word: was the town old?")]
    with tempfile.TemporaryDirectory(prefix="chatapp-bench-") as tmp:
        disk = DiskCache(Path(tmp) / "kv", loaded, budget_gb=1e6)
        disk.save(1, session, wait=True)
        held = list(session.cache_ids)
        job = Path(tmp) / "chat.json"
        job.write_text(
            json.dumps(
                {"chat_id": 1, "messages": [(m.role, m.content) for m in messages], "max_new_tokens": max_new_tokens}
            )
        )
        command = [sys.executable, "-m", "chatapp.engine.restart_probe", "--model", loaded.source.ref]
        command += ["--preset", loaded.preset, "--device", loaded.device, "--kv-dir", str(disk.folder)]
        done = subprocess.run([*command, "--chat", str(job)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the restart probe failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        probe = json.loads(done.stdout)
    prompt = session.preview_ids(messages, max_new_tokens)  # what a fresh session renders, trimmed to fit
    cold, restored = probe["cold"], probe["restored"]
    return {
        "cold": {"prefilled_tokens": cold["prefilled_tokens"], "ttft_s": cold["ttft_s"]},
        "restored": {k: restored[k] for k in ("prefilled_tokens", "ttft_s", "restore_s", "snapshot_bytes")},
        "new_tokens": len(prompt) - common_prefix_len(prompt, held),
        "identical_outputs": cold["tokens"] == restored["tokens"],
    }


def format_table(result: dict) -> str:
    lines = [
        f"model {result['model']} · preset {result['preset']} · {result['device']} · {result['attn_implementation']}",
        f"{'turn':>4} | {'prompt':>6} | {'prefill cached':>14} | {'prefill naive':>13} | "
        f"{'ttft cached':>11} | {'ttft naive':>10} | {'tok/s cached':>12}",
    ]
    for c, n in zip(result["cached"], result["naive"], strict=True):
        lines.append(
            f"{c['turn']:>4} | {c['prompt_tokens']:>6} | {c['prefilled_tokens']:>14} | {n['prefilled_tokens']:>13} | "
            f"{c['ttft_s']:>10.2f}s | {n['ttft_s']:>9.2f}s | {c['decode_tokens_per_s']:>12.1f}"
        )
    lines += [
        f"whole conversation: cached {result['cached_total_s']:.1f}s, naive {result['naive_total_s']:.1f}s "
        f"({result['speedup']:.1f}x)",
        f"identical outputs: {result['identical_outputs']}",
        f"decode on the first prompt: app {result['app_tok_s']:.1f} tok/s, "
        f"raw generate {result['raw_generate_tok_s']:.1f} tok/s, "
        f"bare model() loop {result['bare_step_tok_s']:.1f} tok/s (app {result['app_vs_bare']:.2f}x)",
    ]
    spec = result["speculative"]
    if spec["mode"] != "off":
        share = spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0
        lines.append(
            f"speculative {spec['mode']}: drafted {spec['drafted']}, accepted {spec['accepted']} ({share:.0%}); "
            f"decode {spec['decode_tokens_per_s']:.1f} tok/s, without drafts {spec['plain_decode_tokens_per_s']:.1f}; "
            f"identical outputs: {spec['identical_outputs']}"
        )
    if "restart" in result:
        r = result["restart"]
        cold, restored = r["cold"], r["restored"]
        lines += [
            f"after a restart, the next message ({r['new_tokens']} new tokens): "
            f"cold prefilled {cold['prefilled_tokens']}, ttft {cold['ttft_s']:.2f}s; "
            f"restored prefilled {restored['prefilled_tokens']}, ttft {restored['ttft_s']:.2f}s "
            f"(read {restored['snapshot_bytes'] / 1e6:.1f} MB in {restored['restore_s']:.2f}s); "
            f"identical outputs: {r['identical_outputs']}"
        ]
    return "\n".join(lines)
