"""What a model folder must hold before transformers loads it, said in one line each: weights chatapp will load,
no code it wasn't told to run, and a tokenizer."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError, first_line
from ..facts import read_config
from ..hub import pickle_only


def check_weights(folder: Path, label: str, *, allow_pickle: bool) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickles:
        if allow_pickle:
            return
        raise ModelLoadError(pickle_only(label, pickles[0]))
    raise ModelLoadError(f"'{label}' has no weights (no .safetensors files in {folder})")


def remote_code_refusal(label: str, what: str) -> str:
    return (
        f"'{label}' needs its own Python code to load ({what}), and chatapp runs a model's code only when told: "
        "pass --trust-remote-code if you trust it (in the app: trust_remote_code = true in its models.toml entry)"
    )


def check_remote_code(folder: Path, label: str, *, trust_remote_code: bool) -> None:
    """Refuse, naming the flag, a model whose architecture only its own code provides (config.json's auto_map
    for a model_type transformers doesn't know), before transformers asks on stdin or answers in its own words.
    A tokenizer's own code is caught when the tokenizer loads (see tokenizer_problem)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = folder / "config.json"
    if trust_remote_code or not path.is_file():
        return
    config = read_config(path)
    auto_map = config.get("auto_map")
    if auto_map and config.get("model_type") not in CONFIG_MAPPING:
        raise ModelLoadError(remote_code_refusal(label, f"auto_map in {path.name} names {_classes(auto_map)}"))


def _classes(auto_map) -> str:
    values = auto_map.values() if isinstance(auto_map, dict) else []
    names = [v if isinstance(v, str) else next((x for x in v if x), "") if isinstance(v, list) else "" for v in values]
    return ", ".join(sorted({n for n in names if n})) or "its own classes"


#: The files a tokenizer's vocabulary comes in: one of them must be there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")


def tokenizer_problem(folder: Path, label: str, exc: BaseException) -> str:
    if "trust_remote_code" in str(exc):
        return remote_code_refusal(label, "its tokenizer's code, named in tokenizer_config.json")
    found = sorted({p.name for pattern in TOKENIZER_FILES for p in folder.glob(pattern)})
    if not found:
        return (
            f"'{label}' has no tokenizer: {folder} holds none of {', '.join(TOKENIZER_FILES)}; "
            "download the model again, or copy the tokenizer files from the model it was made from"
        )
    return f"can't load the tokenizer of '{label}' from {', '.join(found)} in {folder}: {first_line(exc)}"
