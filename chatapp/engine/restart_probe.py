"""`python -m chatapp.engine.restart_probe`: the second half of `chatapp bench --restart`, in a fresh process.

It loads the model as the bench did and answers the chat's next message twice in new sessions: `cold`
re-reads the whole conversation, `restored` first reads the snapshot a quit would have left. One JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def answer(loaded, messages, max_new_tokens: int, disk=None, chat_id: int = 0) -> dict:
    from ..sampling import GREEDY
    from .session import ChatSession

    started = time.perf_counter()
    session = ChatSession(loaded)
    restore_s = 0.0
    if disk is not None:
        if not disk.restore(chat_id, session, messages, max_new_tokens):
            raise SystemExit(f"the snapshot of chat {chat_id} was not restored")
        restore_s = time.perf_counter() - started
    tokens, stats = [], None
    for response in session.reply_to(messages, replace(GREEDY, max_new_tokens=max_new_tokens)):
        if response.token is not None:
            tokens.append(response.token)
        stats = response.stats or stats
    # The session's own ttft starts after the restore: the user waits for both.
    return {
        "prefilled_tokens": stats.prefilled_tokens,
        "ttft_s": restore_s + stats.ttft_s,
        "restore_s": restore_s,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--kv-dir", required=True, type=Path)
    parser.add_argument("--chat", required=True)  # a JSON file: {"chat_id", "messages", "max_new_tokens"}
    args = parser.parse_args(argv)

    from ..config import load_settings
    from .disk_cache import DiskCache
    from .loader import load_model
    from .session import Message

    job = json.loads(Path(args.chat).read_text())
    loaded = load_model(args.model, args.preset, settings=load_settings(), device=args.device)
    messages = [Message(role, content) for role, content in job["messages"]]
    answer(loaded, messages[:1], 2)  # warm-up, so neither run pays first-call costs
    disk = DiskCache(args.kv_dir, loaded, budget_gb=1e6)
    cold = answer(loaded, messages, job["max_new_tokens"])
    restored = answer(loaded, messages, job["max_new_tokens"], disk, job["chat_id"])
    restored["snapshot_bytes"] = disk.path(job["chat_id"]).stat().st_size
    json.dump({"cold": cold, "restored": restored}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
