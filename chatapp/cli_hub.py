"""`chatapp pull`, `rm`, `models` and `search`: the Hub commands."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import TYPE_CHECKING

from . import units
from .errors import ChatappError
from .units import gb, mb

if TYPE_CHECKING:
    import argparse

    from .config import Settings


def _repo_of(ref: str, settings: Settings):
    from .catalog import load_catalog
    from .refs import parse_ref

    source = parse_ref(ref, load_catalog(settings.config_dir / "models.toml"))
    if source.kind != "hub":
        raise ChatappError(f"'{ref}' is a local model ({source.path}), not a Hub repo")
    return source


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    from .hardware import detect
    from .hub_download import DownloadCancelled, download, refuse_what_cannot_fit
    from .progress import ProgressBar

    source = _repo_of(args.model, settings)
    fit_check = refuse_what_cannot_fit(source, detect, " (--force downloads it anyway)")

    bar = ProgressBar(source.label)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        folder = download(
            source.repo_id,
            source.revision,
            allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
            progress=bar.update,
            cancel=cancel,
            before_fetch=None if args.force else fit_check,
        )
    except DownloadCancelled as exc:
        bar.close()
        print(f"chatapp: {exc}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a tool stopped with Ctrl+C
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    print(folder)
    return 0


def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    from . import hub

    source = _repo_of(args.model, settings)
    freed = hub.delete(source.repo_id)
    print(f"deleted {source.repo_id}: {mb(freed)} freed")
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from . import hub
    from .catalog import load_catalog
    from .choices import catalog_rows, local_rows
    from .hardware import detect

    hw = detect()
    local = {m.repo_id: m for m in hub.list_local()}
    cap = settings.context_cap or None
    rows = [] if args.local else catalog_rows(load_catalog(settings.config_dir / "models.toml"), hw, local, cap)
    known = {r.repo for r in rows if r.size_on_disk}
    rows += local_rows({k: m for k, m in local.items() if args.local or k not in known}, hw, cap)
    listed = []
    for r in rows:
        choice = r.plan.choice if r.fits else None
        entry = {
            "key": None if r.ref == r.repo else r.ref,
            "repo": r.repo,
            "name": r.name,
            "gated": r.gated if r.ref != r.repo else None,
            "downloaded": r.ready,
            "size_bytes": r.size_on_disk,
            "fit": r.verdict if r.plan else None,
            "context_tokens": choice.context_tokens if choice else None,
            "max_context_tokens": choice.max_context_tokens if choice else None,
            "decode_tokens_per_s": r.tokens_per_s,
        }
        if r.repo in local and r.ref == r.repo:
            entry["revisions"] = list(local[r.repo].revisions)
        listed.append(entry)
    if args.json:
        print(json.dumps(listed))
        return 0
    for r, e in zip(rows, listed, strict=True):
        size = gb(r.size_on_disk, 2) if r.size_on_disk else ("bundled" if r.ready else "-")
        fit = f"  [{r.verdict} · {r.speed}]" if r.fits else (f"  [{r.verdict}]" if r.plan else "")
        print(f"{(e['key'] or r.repo):<24} {size:>10}  {'gated ' if r.gated else ''}{r.name}{fit}")
    return 0


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from . import hub
    from .hardware import detect
    from .report import weights_verdict

    hw = detect()
    results = hub.search(args.text, args.limit)
    if args.json:
        print(json.dumps([{**r.__dict__, "fit": weights_verdict(hw, r.params)} for r in results]))
        return 0
    if not results:
        print(f"no text-generation models match '{args.text}'")
    for r in results:
        print(
            f"{r.repo_id:<40} {units.params(r.params):>7} {r.downloads:>10,} downloads  {r.last_modified}"
            f"{'  gated' if r.gated else ''}  [{weights_verdict(hw, r.params)}]"
        )
    return 0
