"""What the planner needs to know about a model, read without downloading (or loading) its weights.

Sources: a catalog entry's own numbers, a config.json plus safetensors headers (local folder, or the Hub
through `get_safetensors_metadata`, which reads headers only), or a GGUF file's metadata.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .catalog import ModelSpec
from .errors import ModelLoadError, ModelNotFound, first_line
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
    #: transformers runs this architecture's attention eagerly, holding each layer's scores: Gemma 2, whose
    #: soft-capped logits SDPA can't take.
    eager_attention: bool = False

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
        eager_attention=a.get("eager_attention", False),
    )


#: Other names some architectures' config.json uses for the same numbers (transformers maps them with attribute_map).
_ALIASES = {
    "hidden_size": ("n_embd", "d_model"),
    "num_hidden_layers": ("n_layer", "n_layers", "num_layers"),
    "num_attention_heads": ("n_head", "n_heads", "num_heads"),
    "max_position_embeddings": ("n_positions", "max_seq_len"),
}


def _size(config: dict, key: str, where: str, required: bool = True) -> int | None:
    """config[key] (or an alias of it) as a size: a whole number above 0. A zero or negative size would give the
    planner nonsense (or a division by zero), so it is refused here, naming the file."""
    for name in (key, *_ALIASES.get(key, ())):
        if config.get(name) is not None:
            value = config[name]
            break
    else:
        if required:
            raise ModelLoadError(f"{where} has no '{key}', which chatapp needs to plan memory for the model")
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{where}: '{name}' must be a whole number above 0, got {value!r}")
    return value


def read_config(path: Path) -> dict:
    """A config.json as a dict; a file that isn't a JSON object is one line naming it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"'{path}' is not valid JSON (it is not UTF-8 text)") from None
    except OSError as exc:
        raise ModelLoadError(f"can't read '{path}': {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"'{path}' is not a JSON object of settings, so it is not a model's config.json")
    return config


#: Model types whose transformers config class ties the output layer to the embeddings unless config.json says
#: otherwise: Gemma's published config.json files leave `tie_word_embeddings` out.
TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


def _sliding_layers(config: dict, layers: int) -> int:
    """How many layers attend through the sliding window, as transformers lays them out when config.json has no
    `layer_types`: Gemma 2 alternates from the first layer, Gemma 3 makes every `sliding_window_pattern`-th
    layer (6th by default) global, and the others slide in every layer."""
    model_type = config.get("model_type")
    if model_type == "gemma2":
        return (layers + 1) // 2
    if model_type in ("gemma3", "gemma3_text"):
        pattern = config.get("sliding_window_pattern")
        pattern = pattern if isinstance(pattern, int) and pattern > 0 else 6
        return layers - layers // pattern
    return layers


def facts_from_config(name: str, config: dict, params: int, where: str | None = None) -> ModelFacts:
    """ModelFacts from a transformers config.json (text part) and a parameter count; `where` names the file in
    errors."""
    where = where or f"the config.json of '{name}'"
    if isinstance(config.get("text_config"), dict):
        config, where = config["text_config"], f"{where} (text_config)"
    hidden = _size(config, "hidden_size", where)
    heads = _size(config, "num_attention_heads", where)
    layers = _size(config, "num_hidden_layers", where)
    window = _size(config, "sliding_window", where, False) if config.get("use_sliding_window", True) else None
    layer_types = config.get("layer_types")
    layer_types = layer_types if isinstance(layer_types, list) else []
    sliding_layers = (
        sum(1 for t in layer_types if t == "sliding_attention") if layer_types else _sliding_layers(config, layers)
    )
    return ModelFacts(
        name=name,
        params=params,
        layers=layers,
        hidden_size=hidden,
        intermediate_size=_size(config, "intermediate_size", where, False) or 4 * hidden,
        attention_heads=heads,
        kv_heads=_size(config, "num_key_value_heads", where, False) or heads,
        head_dim=_size(config, "head_dim", where, False) or max(1, hidden // heads),
        vocab_size=_size(config, "vocab_size", where),
        tied_embeddings=bool(config.get("tie_word_embeddings", config.get("model_type") in TIED_BY_DEFAULT)),
        max_context=_size(config, "max_position_embeddings", where, False) or 4096,
        sliding_window=window,
        sliding_layers=sliding_layers if window else 0,
        eager_attention=config.get("attn_logit_softcapping") is not None,
    )


def safetensors_param_count(path: Path) -> int:
    """Parameters in a .safetensors file, from its header alone (safetensors checks the header against the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np") as handle:
            return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    except SafetensorError as exc:
        reason = str(exc).removeprefix("Error while deserializing header: ")
        raise ModelLoadError(
            f"can't load '{path}': it is not a valid safetensors file ({reason}); "
            "it may be cut short: download or copy it again"
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"can't read '{path}': {exc.strerror or exc}") from None


def facts_from_folder(folder: Path, name: str | None = None) -> ModelFacts:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFound(f"folder '{folder}' has no config.json, so it is not a Hugging Face model folder")
    config = read_config(config_path)
    params = sum(safetensors_param_count(p) for p in folder.glob("*.safetensors"))
    return facts_from_config(name or folder.name, config, params, where=f"'{config_path}'")


def facts_from_gguf(path: Path, name: str | None = None) -> ModelFacts:
    """Facts from a GGUF file's metadata and tensor shapes (the gguf package reads them without loading weights)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, IndexError, OSError, struct.error) as exc:
        raise ModelLoadError(f"'{path}' is not a readable GGUF file ({first_line(exc)})") from None
    # Only the numbers: reading every field would decode the whole vocabulary and merges too.
    wanted = ("embedding_length", "attention.head_count", "attention.head_count_kv", "attention.key_length")
    wanted += ("block_count", "feed_forward_length", "vocab_size", "context_length", "attention.sliding_window")
    fields = {key: reader.fields[f"{arch}.{key}"].contents() for key in wanted if f"{arch}.{key}" in reader.fields}
    where = f"'{path}'"
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data):
        fields["vocab_size"] = len(tokens.data)
    hidden = _size(fields, "embedding_length", where)
    heads = _size(fields, "attention.head_count", where)
    names = {t.name for t in reader.tensors}
    layers = _size(fields, "block_count", where)
    window = _size(fields, "attention.sliding_window", where, False)
    return ModelFacts(
        name=name or path.stem,
        params=sum(int(t.n_elements) for t in reader.tensors),
        layers=layers,
        hidden_size=hidden,
        intermediate_size=_size(fields, "feed_forward_length", where, False) or 4 * hidden,
        attention_heads=heads,
        kv_heads=_size(fields, "attention.head_count_kv", where, False) or heads,
        head_dim=_size(fields, "attention.key_length", where, False) or max(1, hidden // heads),
        vocab_size=_size(fields, "vocab_size", where),
        tied_embeddings="output.weight" not in names,
        max_context=_size(fields, "context_length", where, False) or 4096,
        sliding_window=window,
        sliding_layers=_gguf_sliding_layers(reader, arch, layers) if window else 0,
        eager_attention=f"{arch}.attn_logit_softcapping" in reader.fields,
    )


def _gguf_sliding_layers(reader, arch: str, layers: int) -> int:
    """How many layers slide: llama.cpp's conversions may write a flag per layer, or n for every n-th layer global
    (Gemma 3's `sliding_window_pattern`); else the architecture decides, as in transformers (_sliding_layers)."""
    field = reader.fields.get(f"{arch}.attention.sliding_window_pattern")
    pattern = field.contents() if field is not None else None
    if isinstance(pattern, list) and len(pattern) == layers:
        return sum(1 for flag in pattern if flag)
    if isinstance(pattern, int) and pattern > 0:
        return layers - layers // pattern
    return _sliding_layers({"model_type": arch}, layers)


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
