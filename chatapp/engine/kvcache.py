"""How a chat's KV cache is made, rolled back, and taken apart for a snapshot.

Each layer keeps its keys and values in a buffer that grows in steps of STEP tokens, as mlx-lm's cache
does, and hands attention a view of the part in use. transformers' DynamicCache concatenates instead,
copying every layer's whole cache on every token: at 6k tokens that copy took 40% of a decode step here.
Rolling back is moving the end of the view; the next token overwrites what was dropped.

Sliding-window layers (Gemma 2 and 3) keep only their last `window - 1` tokens, so once full they can't be
rolled back. We restrict them to the window ourselves at the start of each turn (`settle`): within a turn
they keep every token, so the next turn can roll back anywhere inside the last one (a template that rewrites
the last reply, a regenerate, an edit of the last message) and only a rollback further back than that
rebuilds the cache. The cost is memory: until the next turn starts, a sliding layer holds the window plus
the whole last turn.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

#: Tokens a layer's buffer grows by: a growth copies the layer about once per STEP tokens, and at most
#: STEP - 1 tokens' room sits unused.
STEP = 256


def _room(tokens: int) -> int:
    """Room for `tokens` tokens, in whole steps (at least one)."""
    return max(-(-tokens // STEP), 1) * STEP


def _buffer(like: torch.Tensor, tokens: int) -> torch.Tensor:
    """A zeroed buffer shaped like `like` with _room(tokens).

    Zeroed, because attention may read all of it (`whole`): past the tokens in use it then finds zeros or
    tokens rolled back, never uninitialized memory that could hold a NaN.
    """
    return like.new_zeros((*like.shape[:-2], _room(tokens), like.shape[-1]))


def whole(view: torch.Tensor) -> torch.Tensor | None:
    """The buffer whose first tokens `view` is, when `view` is a growing layer's keys or values; else None."""
    buffer = getattr(view, "buffer", None)
    if buffer is None or view.data_ptr() != buffer.data_ptr():
        return None
    return buffer


class _Buffered:
    """The buffer both layer kinds share: `keys`/`values` are always views of its first `length` tokens."""

    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    length = 0

    @torch.inference_mode()
    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.length + keys.shape[-2]
        if self._k is None or end > self._k.shape[-2]:
            grown_k, grown_v = _buffer(keys, end), _buffer(values, end)
            if self.length:
                grown_k[..., : self.length, :] = self._k[..., : self.length, :]
                grown_v[..., : self.length, :] = self._v[..., : self.length, :]
            self._k, self._v = grown_k, grown_v
        self._k[..., self.length : end, :] = keys
        self._v[..., self.length : end, :] = values
        self._set_length(end)

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._k[..., :length, :]
        self.values = self._v[..., :length, :]
        # Views made in inference mode don't know their base (`_base` is None), so they are told.
        self.keys.buffer, self.values.buffer = self._k, self._v

    def forget(self, tokens: int) -> None:
        """Drop the last `tokens` tokens; the next ones written take their place."""
        self._set_length(max(self.length - tokens, 0))

    @torch.inference_mode()  # the buffers were made in inference mode, where forwards run
    def keep_last(self, tokens: int) -> None:
        """Keep only the last `tokens` tokens, at the front of the buffer.

        A long turn (a pasted document) grows a sliding layer's buffer far past its window; that room goes
        back here rather than stay taken for the rest of the chat.
        """
        if tokens < self.length:
            keys = self._k[..., self.length - tokens : self.length, :].clone()
            values = self._v[..., self.length - tokens : self.length, :].clone()
            if self._k.shape[-2] > _room(tokens):
                self._k, self._v = _buffer(keys, tokens), _buffer(values, tokens)
            self._k[..., :tokens, :] = keys
            self._v[..., :tokens, :] = values
            self._set_length(tokens)

    def to_device(self, device) -> None:
        if self._k is not None:
            self._k, self._v = self._k.to(device), self._v.to(device)
            self._set_length(self.length)
            self.device = self._k.device

    def buffer_bytes(self) -> int:
        return 0 if self._k is None else self._k.nbytes + self._v.nbytes


class GrowingLayer(_Buffered, DynamicLayer):
    """A full-attention layer on a growing buffer."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        return self.keys, self.values


class GrowingSlidingLayer(_Buffered, DynamicSlidingWindowLayer):
    """A sliding-window layer on a growing buffer that keeps the whole turn until `settle` (past recording)."""

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.record_past = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self._append(key_states, value_states)
        # What the mask advertises (get_mask_sizes): the window before the new tokens, and the new tokens.
        visible = self.sliding_window - 1 + key_states.shape[-2]
        return self.keys[..., -visible:, :], self.values[..., -visible:, :]

    def forget(self, tokens: int) -> None:
        super().forget(tokens)
        self.cumulative_length -= tokens


def new_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.layers = [_growing(layer) for layer in cache.layers]
    return cache


def _growing(layer):
    """Our buffered twin of one of DynamicCache's layers; a kind we don't know stays as it is (and can't roll back)."""
    if type(layer) is DynamicLayer:
        return GrowingLayer()
    if type(layer) is DynamicSlidingWindowLayer:
        return GrowingSlidingLayer(sliding_window=layer.sliding_window)
    return layer


def _kept(layer) -> int:
    """Tokens a layer holds now (a sliding layer may hold fewer than it has seen)."""
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return 0
    if type(layer) is StaticLayer:  # its buffer is all of keys; its position says how much is in use
        return int(layer.cumulative_length)
    return layer.keys.shape[-2]


def rewindable(cache) -> bool:
    """Whether every layer can forget tokens it took since the turn began (what speculative drafts need).

    A quantized, offloaded or remote-code layer can't be cropped safely. A static layer (static_decode) is
    rolled back by moving its position.
    """
    return all(isinstance(layer, _Buffered) or type(layer) is StaticLayer for layer in cache.layers)


def can_drop(cache, tokens: int) -> bool:
    """Whether every layer can forget its last `tokens` tokens and still hold all that the next forward needs."""
    if tokens == 0:
        return True
    if not rewindable(cache):
        return False
    for layer in cache.layers:
        if not isinstance(layer, GrowingSlidingLayer):
            continue
        seen = layer.cumulative_length
        if seen < layer.sliding_window:
            continue  # not full yet: it holds every token, like a full layer
        # After the crop it must still hold the last min(seen - tokens, window - 1) tokens.
        if _kept(layer) - tokens < min(seen - tokens, layer.sliding_window - 1):
            return False
    return True


@torch.inference_mode()  # a cache made in inference mode is only written to there
def drop(cache, tokens: int) -> None:
    """Forget the last `tokens` tokens (check can_drop first).

    Sliding layers keep the room to roll back further (a regenerate, then an edit of the message it
    answered), which their own `crop`, restricting them to the window, would end.
    """
    if not tokens:
        return
    for layer in cache.layers:
        if isinstance(layer, _Buffered) and layer.is_initialized:
            layer.forget(tokens)
        elif layer.is_initialized:
            layer.crop(-tokens)


def settle(cache) -> None:
    """Restrict full sliding layers back to their window, ending the rollback room of the turn before."""
    for layer in cache.layers:
        if isinstance(layer, GrowingSlidingLayer) and layer.cumulative_length >= layer.sliding_window:
            layer.keep_last(layer.sliding_window - 1)


def move(cache, device) -> None:
    for layer in cache.layers:
        if layer.is_initialized and isinstance(layer, _Buffered):
            layer.to_device(device)
            if isinstance(layer, GrowingSlidingLayer):
                layer._sliding_window_tensor = layer._sliding_window_tensor.to(layer.device)
        elif layer.is_initialized and type(layer) is StaticLayer:
            layer.keys, layer.values = layer.keys.to(device), layer.values.to(device)
            layer.cumulative_length = layer.cumulative_length.to(device)
            layer.device = layer.keys.device
            # A compiled step replays CUDA graphs recorded on fixed addresses: tell it these are fixed too.
            for tensor in (layer.keys, layer.values, layer.cumulative_length):
                torch._dynamo.mark_static_address(tensor)


def nbytes(cache) -> int:
    """Bytes the cache has taken, room for the tokens still to come included."""
    if cache is None:
        return 0
    return sum(
        layer.buffer_bytes() if isinstance(layer, _Buffered) else layer.keys.nbytes + layer.values.nbytes
        for layer in cache.layers
        if layer.is_initialized and layer.keys is not None
    )


def tensors(cache) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A copy of the cache, in CPU memory, as named tensors (`k.<layer>`, `v.<layer>`), and each layer's count of
    tokens seen.

    A copy, because the layers write into their buffers: a snapshot being saved while the chat goes on
    would otherwise see a rollback's tokens overwritten.
    """
    out, seen = {}, []
    for i, layer in enumerate(cache.layers):
        if kept := _kept(layer):
            out[f"k.{i}"] = layer.keys[..., :kept, :].to("cpu", copy=True)
            out[f"v.{i}"] = layer.values[..., :kept, :].to("cpu", copy=True)
        seen.append(layer.cumulative_length if isinstance(layer, GrowingSlidingLayer) else _kept(layer))
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
        if not isinstance(layer, _Buffered):
            raise ValueError(f"layer {i} is a {type(layer).__name__}, which a snapshot can't restore")
        keys, values = keys.to(device), values.to(device)
        layer.lazy_initialization(keys, values)
        layer._append(keys, values)
        if isinstance(layer, GrowingSlidingLayer):
            layer.cumulative_length = seen[i]
        elif seen[i] != keys.shape[-2]:
            raise ValueError(f"layer {i} holds {keys.shape[-2]} tokens, not {seen[i]}")
    return cache
