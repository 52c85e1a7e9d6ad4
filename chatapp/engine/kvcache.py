"""How a chat's KV cache is made, rolled back, and taken apart for a snapshot.

Sliding-window layers (Gemma 2 and 3) keep only their last `window - 1` tokens, so once full they can't be
rolled back. We switch on transformers' past recording for them and restrict them to the window ourselves
at the start of each turn (`settle`): within a turn they keep every token, so the next turn can roll back
anywhere inside the last one (a template that rewrites the last reply, a regenerate, an edit of the last
message) and only a rollback further back than that rebuilds the cache. The cost is memory: until the next
turn starts, a sliding layer holds the window plus the whole last turn.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def new_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.activate_past_recording()
    return cache


def _kept(layer) -> int:
    """Tokens a layer holds now (a sliding layer may hold fewer than it has seen)."""
    return 0 if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0 else layer.keys.shape[-2]


def rewindable(cache) -> bool:
    """Whether every layer can forget tokens it took since the turn began (what speculative drafts need).

    A quantized, offloaded or remote-code layer can't be cropped safely, nor a sliding one without past recording.
    """
    return all(
        type(layer) is DynamicLayer or (type(layer) is DynamicSlidingWindowLayer and layer.record_past)
        for layer in cache.layers
    )


def can_drop(cache, tokens: int) -> bool:
    """Whether every layer can forget its last `tokens` tokens and still hold all that the next forward needs."""
    if tokens == 0:
        return True
    if not rewindable(cache):
        return False
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            continue
        seen = layer.cumulative_length
        if seen < layer.sliding_window:
            continue  # not full yet: it holds every token, like a full layer
        # After the crop it must still hold the last min(seen - tokens, window - 1) tokens.
        if _kept(layer) - tokens < min(seen - tokens, layer.sliding_window - 1):
            return False
    return True


def drop(cache, tokens: int) -> None:
    """Forget the last `tokens` tokens (check can_drop first).

    Sliding layers are cut here rather than by their own `crop`, which also restricts them to the window
    and so would end the room to roll back further (a regenerate, then an edit of the message it answered).
    """
    if not tokens:
        return
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        keep = max(_kept(layer) - tokens, 0)
        layer.keys, layer.values = layer.keys[..., :keep, :], layer.values[..., :keep, :]
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length -= tokens


def settle(cache) -> None:
    """Restrict full sliding layers back to their window, ending the rollback room of the turn before."""
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer) and layer.cumulative_length >= layer.sliding_window:
            if _kept(layer) > layer.sliding_window - 1:
                layer.keys = layer.keys[:, :, -layer.sliding_window + 1 :, :]
                layer.values = layer.values[:, :, -layer.sliding_window + 1 :, :]


def move(cache, device) -> None:
    for layer in cache.layers:
        if layer.is_initialized and layer.keys is not None:
            layer.keys, layer.values = layer.keys.to(device), layer.values.to(device)
            layer.device = layer.keys.device
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer._sliding_window_tensor = layer._sliding_window_tensor.to(layer.device)


def nbytes(cache) -> int:
    if cache is None:
        return 0
    return sum(
        t.nbytes for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values) if t is not None
    )


def tensors(cache) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The cache as named tensors (`k.<layer>`, `v.<layer>`) and each layer's count of tokens seen.

    The tensors are the layers' own (no copy): a DynamicCache replaces its tensors instead of writing
    into them, so these stay as they are while the chat goes on.
    """
    out, seen = {}, []
    for i, layer in enumerate(cache.layers):
        if _kept(layer):
            out[f"k.{i}"] = layer.keys
            out[f"v.{i}"] = layer.values
        seen.append(getattr(layer, "cumulative_length", _kept(layer)))
    return out, seen


def from_tensors(config, named: dict[str, torch.Tensor], seen: list[int], device) -> DynamicCache:
    """A cache rebuilt from `tensors`' output; ValueError when it doesn't fit this model's layers."""
    cache = new_cache(config)
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if len(seen) != len(cache.layers):
        raise ValueError(f"it has {len(seen)} layers, the model {len(cache.layers)}")
    for i, layer in enumerate(cache.layers):
        keys, values = named.get(f"k.{i}"), named.get(f"v.{i}")
        if keys is None or values is None:
            if seen[i]:
                raise ValueError(f"layer {i} is missing")
            continue
        if keys.shape != values.shape or keys.dim() != 4 or tuple(keys.shape[1::2]) != (heads, head_dim):
            raise ValueError(f"layer {i} has keys {tuple(keys.shape)}, not (1, {heads}, n, {head_dim})")
        layer.lazy_initialization(keys.to(device), values.to(device))
        layer.keys, layer.values = keys.to(device), values.to(device)
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = seen[i]
        elif seen[i] != keys.shape[-2]:
            raise ValueError(f"layer {i} holds {keys.shape[-2]} tokens, not {seen[i]}")
    return cache
