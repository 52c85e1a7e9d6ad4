"""A chat's KV cache on disk: the key it is valid for, writing it atomically, reading it back.

File layout and the disk budget are in chatapp.snapshots (no torch there, so the UI can list and delete).
A snapshot is a hint, never the truth: after a restore the session's common-prefix step compares ids, so a
stale snapshot costs time, never correctness; one that can't be read is ignored and the turn re-prefills.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..snapshots import FORMAT_VERSION, SnapshotError, key_hash, read_header
from . import kvcache
from .loader import LoadedModel


def _folder_hash(folder: Path) -> str:
    """The model's config and its weight files' headers and sizes: cheap, and changes when the weights do."""
    digest = hashlib.sha256()
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*.bin"))]
    for path in files:
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 16))  # a safetensors header names every tensor and where it lies
    return digest.hexdigest()[:20]


def model_identity(loaded: LoadedModel) -> str:
    source, folder = loaded.source, loaded.folder
    if source.kind == "hub" and folder.parent.name == "snapshots":
        return f"{source.repo_id}@{folder.name}"  # the folder is named after the commit
    return f"{source.label}#{_folder_hash(folder)}"


def model_key(loaded: LoadedModel) -> dict:
    """What a snapshot's tensors depend on. A snapshot is used only by a worker whose key is equal."""
    template = loaded.tokenizer.chat_template or ""
    return {
        "format": FORMAT_VERSION,
        "model": loaded.source.label,
        "identity": model_identity(loaded),
        "preset": loaded.preset,
        "dtype": loaded.dtype,
        "device": loaded.device.split(":")[0],
        "attention": loaded.attn_implementation,
        "template": hashlib.sha256(template.encode()).hexdigest()[:20],
        "transformers": transformers.__version__,
    }


def save(path: Path, key: dict, chat_id: int, ids: list[int], named: dict, seen: list[int]) -> int:
    """Write a snapshot through a private temporary file renamed into place; its size in bytes.

    `named` and `seen` are kvcache.tensors' output. A reader never sees a half-written file under `path`.
    """
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in named.items()}
    tensors["ids"] = torch.tensor(ids, dtype=torch.int64)
    meta = {"key": key, "key_hash": key_hash(key), "chat_id": chat_id, "tokens": len(ids), "seen": seen}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))  # private before a byte is in it
    try:
        save_file(tensors, str(tmp), metadata={"chatapp": json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read_ids(path: Path, key: dict) -> tuple[list[int], dict]:
    """The ids a snapshot holds and its metadata, after checking its header and key, without reading the cache
    tensors."""
    tensors, meta = read_header(path)
    if meta.get("key_hash") != key_hash(key) or meta.get("key") != key:
        raise SnapshotError("it was made with another model, preset or version")
    if "ids" not in tensors:
        raise SnapshotError("it holds no token ids")
    try:
        with safe_open(str(path), framework="pt") as f:
            ids = f.get_tensor("ids").tolist()
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise SnapshotError(f"its ids can't be read ({exc})") from None
    if len(ids) != meta.get("tokens"):
        raise SnapshotError("its ids don't match its header")
    return ids, meta


def load(
    path: Path, key: dict, loaded: LoadedModel, head: tuple[list[int], dict] | None = None
) -> tuple[object, list[int]]:
    """The cache and the ids of a snapshot; SnapshotError when it is corrupt or doesn't fit this model.

    head: what read_ids gave for this file already, so its header is not read again.
    """
    ids, meta = head or read_ids(path, key)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if any(not 0 <= i < vocab for i in ids):
        raise SnapshotError("its token ids are outside the vocabulary")
    device = loaded.model.device
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            named = {name: f.get_tensor(name) for name in f.keys() if name != "ids"}
        cache = kvcache.from_tensors(loaded.model.config, named, list(meta.get("seen") or []), device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise SnapshotError(f"its tensors don't fit this model ({exc})") from None
    if cache.get_seq_length() != len(ids):
        raise SnapshotError(f"its cache holds {cache.get_seq_length()} tokens, its ids {len(ids)}")
    os.utime(path)  # recently used: the disk budget keeps it longer
    return cache, ids


def timed_load(path: Path, key: dict, loaded: LoadedModel, head=None) -> tuple[object, list[int], float]:
    started = time.perf_counter()
    cache, ids = load(path, key, loaded, head)
    return cache, ids, time.perf_counter() - started
