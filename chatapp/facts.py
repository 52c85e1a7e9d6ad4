"""What the planner needs to know about a model, read without downloading (or loading) its weights.

Sources: a catalog entry's own numbers, a config.json plus safetensors headers (local folder, or the Hub
through `get_safetensors_metadata`, which reads headers only), or a GGUF file's metadata.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .catalog import ModelSpec
from .errors import ModelLoadError, ModelNotFound
from .refs import ModelSource


@dataclass(frozen=True)
class ModelFacts:
    name: str
    params: int
    layers: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    max_context: int
    #: Sliding-window attention: the window, and how many of the layers use it (the rest attend to everything).
    sliding_window: int | None = None
    sliding_layers: int = 0

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus an untied lm_head: the parts bitsandbytes leaves in 16-bit."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def quantizable_params(self) -> int:
        """The Linear layers inside the blocks (norms are a rounding error and stay 16-bit too)."""
        return max(0, self.params - self.embedding_params - (2 * self.layers + 1) * self.hidden_size)

    def as_dict(self) -> dict:
        return asdict(self)


def params_from_architecture(
    *,
    layers: int,
    hidden_size: int,
    intermediate_size: int,
    attention_heads: int,
    kv_heads: int,
    head_dim: int,
    vocab_size: int,
    tied_embeddings: bool,
    qkv_bias: bool = False,
    qk_norm: bool = False,
) -> int:
    """Parameter count of a dense Llama-style decoder (Llama, Mistral, Qwen2/3, SmolLM, Gemma, Phi-3 text)."""
    q, kv = attention_heads * head_dim, kv_heads * head_dim
    attention = hidden_size * (q + 2 * kv) + q * hidden_size
    if qkv_bias:
        attention += q + 2 * kv
    if qk_norm:
        attention += 2 * head_dim
    mlp = 3 * hidden_size * intermediate_size
    per_layer = attention + mlp + 2 * hidden_size
    embeddings = vocab_size * hidden_size * (1 if tied_embeddings else 2)
    return layers * per_layer + embeddings + hidden_size


_SHAPE = (
    "layers",
    "hidden_size",
    "intermediate_size",
    "attention_heads",
    "kv_heads",
    "head_dim",
    "vocab_size",
    "tied_embeddings",
)


def facts_from_spec(spec: ModelSpec) -> ModelFacts | None:
    """The catalog entry's own numbers, or None when it doesn't carry them."""
    a = spec.architecture
    if not a:
        return None
    shape = {name: a[name] for name in _SHAPE}
    params = a.get("params") or params_from_architecture(
        **shape, qkv_bias=a.get("qkv_bias", False), qk_norm=a.get("qk_norm", False)
    )
    return ModelFacts(
        name=spec.key,
        params=params,
        **shape,
        max_context=spec.context_length or 4096,
        sliding_window=a.get("sliding_window"),
        sliding_layers=a.get("sliding_layers", 0),
    )


def facts_from_config(name: str, config: dict, params: int) -> ModelFacts:
    """ModelFacts from a transformers config.json (text part) and a parameter count."""
    config = config.get("text_config", config)
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    layer_types = config.get("layer_types") or []
    sliding_layers = (
        sum(1 for t in layer_types if t == "sliding_attention") if layer_types else (layers if window else 0)
    )
    return ModelFacts(
        name=name,
        params=params,
        layers=layers,
        hidden_size=hidden,
        intermediate_size=config.get("intermediate_size", 4 * hidden),
        attention_heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        vocab_size=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_context=config.get("max_position_embeddings") or 4096,
        sliding_window=window,
        sliding_layers=sliding_layers if window else 0,
    )


def safetensors_param_count(path: Path) -> int:
    """Parameters in a .safetensors file, from its JSON header alone."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if length > size - 8:
            raise ModelLoadError(f"can't load '{path}': not a safetensors file (its header runs past the file's end)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise ModelLoadError(f"can't load '{path}': its safetensors header is not valid JSON") from None
    total = 0
    for key, info in header.items():
        if key != "__metadata__":
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


def facts_from_folder(folder: Path, name: str | None = None) -> ModelFacts:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFound(f"folder '{folder}' has no config.json, so it is not a Hugging Face model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    params = sum(safetensors_param_count(p) for p in folder.glob("*.safetensors"))
    return facts_from_config(name or folder.name, config, params)


def facts_from_gguf(path: Path, name: str | None = None) -> ModelFacts:
    """Facts from a GGUF file's metadata and tensor shapes (the gguf package reads them without loading weights)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str, default=None):
        item = reader.fields.get(key)
        if item is None:
            return default
        value = item.contents()
        return value

    arch = field("general.architecture")
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    vocab = len(field("tokenizer.ggml.tokens", []) or []) or int(field(f"{arch}.vocab_size", 0))
    names = {t.name for t in reader.tensors}
    params = sum(int(t.n_elements) for t in reader.tensors)
    return ModelFacts(
        name=name or path.stem,
        params=params,
        layers=int(field(f"{arch}.block_count")),
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length", 4 * hidden)),
        attention_heads=heads,
        kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(f"{arch}.attention.key_length", hidden // heads)),
        vocab_size=vocab,
        tied_embeddings="output.weight" not in names,
        max_context=int(field(f"{arch}.context_length", 4096)),
    )


def facts_for(source: ModelSource) -> ModelFacts:
    """Facts for any model reference, from the cheapest source that has them."""
    if source.spec is not None:
        facts = facts_from_spec(source.spec)
        if facts is not None:
            return facts
    if source.kind == "gguf":
        return facts_from_gguf(source.path, source.label)
    if source.kind == "folder":
        return facts_from_folder(source.path, source.label)
    from .hub import model_facts

    return model_facts(source.repo_id, source.revision)
