"""`chatapp config path|show`: where the config file is, and every setting with its source and meaning."""

from __future__ import annotations

import sys
from dataclasses import fields

from .config import Settings, config_file_path, field_docs, format_value, load_settings_sourced


def format_settings(settings: Settings, sources: dict[str, str]) -> list[str]:
    """One `key = value  # [source] doc` line per field, the comments lined up."""
    docs = field_docs()
    pairs = [(f"{f.name} = {format_value(getattr(settings, f.name))}", f.name) for f in fields(Settings)]
    width = max(len(assignment) for assignment, _ in pairs)
    lines = []
    for assignment, name in pairs:
        comment = f"[{sources.get(name, 'default')}] {docs.get(name, '')}".rstrip()
        lines.append(f"{assignment.ljust(width)}  # {comment}")
    return lines


def cmd_config(args) -> int:
    # Settings are loaded here, leniently, so `config` still works (and explains) when a value is bad.
    path = config_file_path()
    if args.action == "path":
        print(path)
        return 0
    settings, errors, sources = load_settings_sourced(path)
    for line in errors:
        print(f"chatapp: warning: {line}", file=sys.stderr)
    print(f"# {path}" + ("" if path.is_file() else " (missing: every value is a default)"))
    for line in format_settings(settings, sources):
        print(line)
    return 0
