"""One-time conversion of a .gguf file into a normal HF checkpoint folder (bf16 safetensors + tokenizer)."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from pathlib import Path

from ..errors import ModelLoadError, first_line

_DONE_MARKER = ".chatapp-complete"


def converted_folder(gguf: Path, root: Path) -> Path:
    stat = gguf.stat()
    identity = f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return root / f"{gguf.stem}-{hashlib.sha1(identity.encode()).hexdigest()[:10]}"


def is_converted(gguf: Path, root: Path) -> bool:
    return (converted_folder(gguf, root) / _DONE_MARKER).is_file()


def convert_gguf(gguf: Path, root: Path) -> Path:
    """The converted folder for gguf, converting on first use. A half-written folder is never used."""
    target = converted_folder(gguf, root)
    if is_converted(gguf, root):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True: we want plain weights every preset can load, not GGUF blocks.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(str(gguf.resolve()))
    except (ValueError, OSError, KeyError, RuntimeError, struct.error) as exc:  # struct: a file cut short
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelLoadError(f"could not convert '{gguf}': {first_line(exc)}") from None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target
