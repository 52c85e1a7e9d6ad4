"""`chatapp cache`: the chats' KV cache snapshots on disk, listed or cleared. Imports no torch."""

from __future__ import annotations

import json
import sys

from . import snapshots
from .config import Settings
from .units import duration, size


def _titles(settings: Settings) -> dict[int, str]:
    from .store import Store, StoreError

    if not (settings.data_dir / "chatapp.db").exists():
        return {}
    try:
        with Store.open(settings.data_dir) as store:
            return {c.id: c.title for c in store.conversations()}
    except StoreError:
        return {}


def cmd_cache(args, settings: Settings) -> int:
    folder = snapshots.kv_dir(settings.data_dir)
    if args.action == "clear":
        if args.chat is None and args.model is None and not args.all:
            print("chatapp: error: say what to clear: --chat N, --model NAME or --all", file=sys.stderr)
            return 2
        count, freed = snapshots.delete(folder, chat_id=args.chat, model=args.model)
        print(f"deleted {count} snapshot(s), {size(freed)}")
        return 0
    good, bad = snapshots.list_snapshots(folder)
    titles = _titles(settings)
    budget = snapshots.budget_bytes(folder, settings.kv_disk_budget) if settings.kv_disk_budget > 0 else 0
    total = sum(s.size_bytes for s in good)
    if args.json:
        rows = [
            {
                "chat": s.chat_id,
                "title": titles.get(s.chat_id),
                "model": s.model,
                "preset": s.preset,
                "tokens": s.tokens,
                "bytes": s.size_bytes,
                "age_s": round(s.age_s()),
                "path": str(s.path),
            }
            for s in good
        ]
        print(json.dumps({"snapshots": rows, "total_bytes": total, "budget_bytes": budget, "unreadable": len(bad)}))
        return 0
    if not good:
        print(f"no KV snapshots in {folder}")
    else:
        print(f"{'chat':<28} {'model':<24} {'preset':<6} {'tokens':>8} {'size':>9} {'age':>8}")
        for s in good:
            chat = f"{s.chat_id} {titles.get(s.chat_id, '(deleted)')}"[:28]
            age = duration(s.age_s())
            print(f"{chat:<28} {s.model[:24]:<24} {s.preset:<6} {s.tokens:>8,} {size(s.size_bytes):>9} {age:>8}")
    used = f"{size(total)} of a {size(budget)} budget" if budget else f"{size(total)} (snapshots are off)"
    print(f"total: {len(good)} snapshot(s), {used}" + (f"; {len(bad)} unreadable file(s)" if bad else ""))
    return 0
