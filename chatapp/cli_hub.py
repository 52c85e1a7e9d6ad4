"""`chatapp pull`, `rm`, `models` and `search`: the Hub commands."""

from __future__ import annotations

import json
import signal
import threading

from . import planner
from .errors import ChatappError


def _repo_of(ref: str, settings):
    from .catalog import load_catalog
    from .refs import parse_ref

    source = parse_ref(ref, load_catalog(settings.config_dir / "models.toml"))
    if source.kind != "hub":
        raise ChatappError(f"'{ref}' is a local model ({source.path}), not a Hub repo")
    return source


def cmd_pull(args, settings) -> int:
    from .hub_download import download
    from .progress import ProgressBar

    source = _repo_of(args.model, settings)
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
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    print(folder)
    return 0


def cmd_rm(args, settings) -> int:
    from . import hub

    source = _repo_of(args.model, settings)
    freed = hub.delete(source.repo_id)
    print(f"deleted {source.repo_id}: {freed / 1e6:,.1f} MB freed")
    return 0


def cmd_models(args, settings) -> int:
    from . import hub
    from .catalog import load_catalog

    from .facts import facts_from_spec
    from .hardware import detect
    from .report import verdict

    hw = detect()
    local = {m.repo_id: m for m in hub.list_local()}
    rows = []
    if not args.local:
        for spec in load_catalog(settings.config_dir / "models.toml").values():
            found = local.get(spec.repo) if not spec.gguf_package else None
            facts = facts_from_spec(spec)
            rows.append({"key": spec.key, "repo": spec.repo, "name": spec.name, "gated": spec.gated,
                         "downloaded": bool(found) or bool(spec.gguf_package),
                         "size_bytes": found.size_bytes if found else None,
                         "fit": verdict(planner.choose(hw, facts)) if facts else None})
    known = {r["repo"] for r in rows}
    for model in local.values():
        if args.local or model.repo_id not in known:
            rows.append({"key": None, "repo": model.repo_id, "name": model.repo_id, "gated": None,
                         "downloaded": True, "size_bytes": model.size_bytes, "revisions": list(model.revisions),
                         "fit": None})
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        size = f"{r['size_bytes'] / 1e9:.2f} GB" if r["size_bytes"] else ("bundled" if r["downloaded"] else "-")
        fit = f"  [{r['fit']}]" if r["fit"] else ""
        print(f"{(r['key'] or r['repo']):<24} {size:>10}  {'gated ' if r['gated'] else ''}{r['name']}{fit}")
    return 0


def cmd_search(args, settings) -> int:
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
        params = f"{r.params / 1e9:.2f}B" if r.params else "?"
        print(
            f"{r.repo_id:<40} {params:>7} {r.downloads:>10,} downloads  {r.last_modified}"
            f"{'  gated' if r.gated else ''}  [{weights_verdict(hw, r.params)}]"
        )
    return 0
