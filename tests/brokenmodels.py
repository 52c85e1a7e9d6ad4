"""Model folders and catalog entries broken the ways users' downloads and hand edits break them, each with the file
and the words its one-line error must name."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def _config(**changes):
    """A config.json edit: a key set to a value, or removed where the value is ...."""

    def edit(config: dict) -> None:
        for key, value in changes.items():
            if value is ...:
                config.pop(key)
            else:
                config[key] = value

    return edit


#: kind -> (config.json edit, or raw config.json text, or safetensors bytes; the file named; what it must say)
BROKEN_FOLDERS = {
    "config not JSON": ("{not json", "config.json", "is not valid JSON"),
    "config a JSON list": ("[1, 2]", "config.json", "is not a JSON object"),
    "config not UTF-8": (b"\xff\xfe{", "config.json", "is not valid JSON"),
    "no hidden_size": (_config(hidden_size=...), "config.json", "has no 'hidden_size'"),
    "no num_attention_heads": (_config(num_attention_heads=...), "config.json", "has no 'num_attention_heads'"),
    "no num_hidden_layers": (_config(num_hidden_layers=...), "config.json", "has no 'num_hidden_layers'"),
    "no vocab_size": (_config(vocab_size=...), "config.json", "has no 'vocab_size'"),
    "zero layers": (_config(num_hidden_layers=0), "config.json", "'num_hidden_layers' must be a whole number above 0"),
    "zero heads": (_config(num_attention_heads=0), "config.json", "'num_attention_heads' must be a whole number"),
    "zero kv heads": (_config(num_key_value_heads=0), "config.json", "'num_key_value_heads' must be a whole number"),
    "zero head_dim": (_config(head_dim=0), "config.json", "'head_dim' must be a whole number above 0, got 0"),
    "negative hidden_size": (_config(hidden_size=-64), "config.json", "'hidden_size' must be a whole number above 0"),
    "negative intermediate": (_config(intermediate_size=-1), "config.json", "'intermediate_size' must be a whole"),
    "negative context": (_config(max_position_embeddings=-5), "config.json", "'max_position_embeddings' must be"),
    "zero vocab": (_config(vocab_size=0), "config.json", "'vocab_size' must be a whole number above 0, got 0"),
    "text hidden_size": (_config(hidden_size="big"), "config.json", "'hidden_size' must be a whole number"),
    "fractional layers": (_config(num_hidden_layers=2.5), "config.json", "'num_hidden_layers' must be a whole"),
    "weights under 8 bytes": (b"\x01\x02", "model.safetensors", "is not a valid safetensors file"),
    "header past the end": (
        struct.pack("<Q", 10**6) + b"{}",
        "model.safetensors",
        "is not a valid safetensors file",
    ),
    "header not JSON": (struct.pack("<Q", 5) + b"{nope", "model.safetensors", "not a valid safetensors"),
    "header a JSON list": (struct.pack("<Q", 2) + b"[]", "model.safetensors", "not a valid safetensors"),
}


def broken_folder(tiny_folder: Path, kind: str, out: Path) -> tuple[Path, str, str]:
    """A copy of tiny_folder broken as `kind` says (unchanged files are links); (folder, file it names, words)."""
    how, name, words = BROKEN_FOLDERS[kind]
    out.mkdir(parents=True)
    for path in tiny_folder.iterdir():
        (out / path.name).symlink_to(path)
    if isinstance(how, bytes) and name == "model.safetensors":
        (out / name).unlink()
        (out / name).write_bytes(how)
    elif isinstance(how, (str, bytes)):
        (out / "config.json").unlink()
        (out / "config.json").write_bytes(how.encode() if isinstance(how, str) else how)
    else:
        config = json.loads((tiny_folder / "config.json").read_text())
        how(config)
        (out / "config.json").unlink()
        (out / "config.json").write_text(json.dumps(config))
    return out, str(out / name), words


_ARCHITECTURE = (
    "layers = 2, hidden_size = 64, intermediate_size = 128, attention_heads = 4, kv_heads = 2, head_dim = 16, "
    "vocab_size = 49152, tied_embeddings = false"
)

#: kind -> (a models.toml entry 'broken' for the repo Org/broken, the words its error must say)
BROKEN_ENTRIES = {
    "zero hidden_size": ("architecture", "hidden_size = 0", "'architecture.hidden_size' must be above 0, got 0"),
    "negative layers": ("architecture", "layers = -2", "'architecture.layers' must be above 0, got -2"),
    "zero kv_heads": ("architecture", "kv_heads = 0", "'architecture.kv_heads' must be above 0, got 0"),
    "zero head_dim": ("architecture", "head_dim = 0", "'architecture.head_dim' must be above 0, got 0"),
    "zero vocab_size": ("architecture", "vocab_size = 0", "'architecture.vocab_size' must be above 0, got 0"),
    "negative params": ("architecture", "params = -1", "'architecture.params' must be above 0, got -1"),
    "negative window": ("architecture", "sliding_window = -4", "'architecture.sliding_window' must be above 0"),
    "zero context": ("entry", "context_length = 0", "field 'context_length' must be above 0, got 0"),
    "negative context": ("entry", "context_length = -5", "field 'context_length' must be above 0, got -5"),
}


def broken_catalog(config_dir: Path, kind: str) -> tuple[Path, str]:
    """A user models.toml whose entry 'broken' is broken as `kind` says; (the file, the words its error says)."""
    where, change, words = BROKEN_ENTRIES[kind]
    field = change.split(" = ")[0]
    arch = ", ".join(p for p in _ARCHITECTURE.split(", ") if not p.startswith(f"{field} ="))
    arch = f"{arch}, {change}" if where == "architecture" else arch
    extra = f"\n{change}" if where == "entry" else ""
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "models.toml"
    path.write_text(f'[models.broken]\nname = "Broken"\nrepo = "Org/broken"{extra}\narchitecture = {{ {arch} }}\n')
    return path, words
