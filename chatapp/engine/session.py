"""ChatSession: the messages, one KV cache for the whole conversation, and the exact ids that cache holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..errors import ContextOverflow
from ..planner import PREFILL_CHUNK
from ..protocol import TurnStats
from .generate import Sampler, StreamDecoder, forward
from .loader import LoadedModel


@dataclass
class Message:
    role: str
    content: str
    #: A reply that was stopped (cancel) before it finished.
    cut: bool = False


def render_ids(tokenizer, messages: list[Message]) -> list[int]:
    """The whole conversation through the chat template, ready for the next assistant reply."""
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    def __init__(self, loaded: LoadedModel, system_prompt: str | None = None, *, context_length: int | None = None):
        self.loaded = loaded
        self.context_length = context_length or loaded.context_length
        self.messages: list[Message] = [Message("system", system_prompt)] if system_prompt else []
        #: Non-system messages dropped from the front of the context to make the conversation fit.
        self.dropped_messages = 0
        self.last_stats: TurnStats | None = None
        #: The token ids sampled in the last turn, stop token included.
        self.last_reply_ids: list[int] = []
        self._cache = None
        self._cache_ids: list[int] = []
        self._cancel = threading.Event()

    # -- what the cache holds -------------------------------------------------------------

    @property
    def cache_ids(self) -> tuple[int, ...]:
        return tuple(self._cache_ids)

    @property
    def cache_tokens(self) -> int:
        return len(self._cache_ids)

    def _new_cache(self):
        return DynamicCache(config=self.loaded.model.config)

    def _rewind(self, keep: int) -> int:
        """Crop the cache to its first `keep` ids; returns how many it holds after (0 if it had to be rebuilt)."""
        drop = len(self._cache_ids) - keep
        if self._cache is not None and keep > 0 and drop >= 0:
            try:
                if drop:
                    self._cache.crop(-drop)
                if self._cache.get_seq_length() == keep:
                    del self._cache_ids[keep:]
                    return keep
            except (RuntimeError, ValueError):
                pass  # e.g. a full sliding-window layer can't roll back: rebuild below
        self._cache = self._new_cache()
        self._cache_ids = []
        return 0

    # -- the conversation -----------------------------------------------------------------

    def _context_messages(self) -> list[Message]:
        system = [m for m in self.messages if m.role == "system"]
        rest = [m for m in self.messages if m.role != "system"]
        return system + rest[self.dropped_messages :]

    def _render_fitting(self, max_new_tokens: int) -> tuple[list[int], int]:
        """Render the conversation, dropping the oldest user/assistant pairs until it fits. Never the system prompt."""
        trimmed = 0
        while True:
            ids = render_ids(self.loaded.tokenizer, self._context_messages())
            if len(ids) + max_new_tokens <= self.context_length:
                return ids, trimmed
            rest = [m for m in self.messages if m.role != "system"][self.dropped_messages :]
            step = 2 if len(rest) > 1 and rest[0].role == "user" and rest[1].role == "assistant" else 1
            if len(rest) - step < 1:
                raise ContextOverflow(
                    f"the message needs {len(ids)} tokens plus {max_new_tokens} for the reply, "
                    f"more than the {self.context_length}-token context; shorten it or lower max_new_tokens"
                )
            self.dropped_messages += step
            trimmed += step

    def reset(self) -> None:
        """Forget the conversation (keeping the system prompt) and the cache."""
        self.messages = [m for m in self.messages if m.role == "system"]
        self.dropped_messages = 0
        self._cache = None
        self._cache_ids = []

    def cancel(self) -> None:
        """Stop the reply being generated; safe to call from another thread."""
        self._cancel.set()

    def send(self, text: str, **params) -> Iterator[str | TurnStats]:
        """Add a user message and stream the reply: text deltas, then one TurnStats."""
        self.messages.append(Message("user", text))
        return self._turn(**params)

    def regenerate(self, **params) -> Iterator[str | TurnStats]:
        """Drop the last reply and answer the last user message again."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1].role != "user":
            raise ValueError("there is no user message to answer")
        return self._turn(**params)

    def edit(self, index: int, text: str, **params) -> Iterator[str | TurnStats]:
        """Change the user message at `index` in self.messages, drop what followed it, and answer it."""
        if not 0 <= index < len(self.messages) or self.messages[index].role != "user":
            raise ValueError(f"message {index} is not a user message")
        self.messages[index] = Message("user", text)
        del self.messages[index + 1 :]
        position = sum(1 for m in self.messages[:index] if m.role != "system")
        self.dropped_messages = min(self.dropped_messages, position)
        return self._turn(**params)

    def reply_to(self, messages: list[Message], **params) -> Iterator[str | TurnStats]:
        """Take `messages` as the conversation and answer its last (user) message.

        For a caller that keeps the conversation itself (the worker, on behalf of the UI): a regenerate or an
        edit is just a different list, and the cache is still reused up to the first token that differs.
        """
        if not messages or messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        same = common_prefix_len(
            [(m.role, m.content) for m in self.messages], [(m.role, m.content) for m in messages]
        )
        self.messages = list(messages)
        self.dropped_messages = min(self.dropped_messages, sum(1 for m in messages[:same] if m.role != "system"))
        return self._turn(**params)

    def cache_bytes(self) -> int:
        """Bytes the KV cache holds now."""
        if self._cache is None:
            return 0
        return sum(
            t.nbytes for layer in self._cache.layers for t in (layer.keys, layer.values) if t is not None
        )

    # -- one turn -------------------------------------------------------------------------

    def _turn(
        self,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
    ) -> Iterator[str | TurnStats]:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self._cancel.clear()
        loaded = self.loaded
        model = loaded.model
        sampler = Sampler(temperature, top_p, seed, device=model.device)
        started = time.perf_counter()
        try:
            ids, trimmed = self._render_fitting(max_new_tokens)
        except ContextOverflow:
            if self.messages and self.messages[-1].role == "user":
                self.messages.pop()
            raise

        keep = self._rewind(min(common_prefix_len(ids, self._cache_ids), len(ids) - 1))
        decoder = StreamDecoder(loaded.tokenizer)
        sampled: list[int] = []
        self.last_reply_ids = sampled
        finish = None
        first_token_at = last_token_at = None
        try:
            with torch.inference_mode():
                logits = self._feed(ids[keep:])
                while True:
                    if self._cancel.is_set():
                        finish = "cancelled"
                        break
                    if len(sampled) < min_new_tokens:
                        logits[:, list(loaded.stop_token_ids)] = float("-inf")
                    token = sampler(logits)
                    last_token_at = time.perf_counter()
                    first_token_at = first_token_at or last_token_at
                    sampled.append(token)
                    if token in loaded.stop_token_ids:
                        finish = "stop"
                        break
                    delta = decoder.push(token)
                    if loaded.stop_strings and any(s in decoder.text for s in loaded.stop_strings):
                        finish = "stop"
                        break
                    if delta:
                        yield delta
                    if len(sampled) >= max_new_tokens:
                        finish = "length"
                        break
                    if self._cancel.is_set():
                        finish = "cancelled"
                        break
                    logits = self._feed([token])
            if not loaded.stop_strings:
                tail = decoder.finish()
                if tail:
                    yield tail
        finally:
            # Runs on normal end, on cancel, and when the caller stops iterating (GeneratorExit):
            # the partial reply is kept, marked as cut, and the cache still matches _cache_ids.
            reply = decoder.text
            for stop in loaded.stop_strings:
                reply = reply.split(stop, 1)[0]
            self.messages.append(Message("assistant", reply, cut=finish in (None, "cancelled")))
        if trimmed and finish in ("stop", "length"):
            finish = "overflow-trimmed"
        decode_s = (last_token_at - first_token_at) if sampled else 0.0
        self.last_stats = TurnStats(
            prompt_tokens=len(ids),
            prefilled_tokens=len(ids) - keep,
            generated_tokens=len(sampled),
            ttft_s=(first_token_at - started) if first_token_at else time.perf_counter() - started,
            decode_tokens_per_s=(len(sampled) - 1) / decode_s if decode_s > 0 else 0.0,
            cache_tokens=len(self._cache_ids),
            finish_reason=finish,
            trimmed_messages=trimmed,
            dropped_messages=self.dropped_messages,
        )
        yield self.last_stats

    def cache_copy(self, tokens: int):
        """An independent copy of the cache holding its first `tokens` ids (for benchmarks against generate())."""
        import copy

        if self._cache is None or tokens > len(self._cache_ids):
            raise ValueError(f"the cache holds {len(self._cache_ids)} tokens, not {tokens}")
        clone = copy.deepcopy(self._cache)
        clone.crop(tokens - len(self._cache_ids))
        return clone

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run ids through the model into the cache, keeping _cache_ids in step with it.

        Long inputs go in chunks of PREFILL_CHUNK tokens, which bounds activation memory (the planner counts on it).
        Except into an empty cache on a CPU: there SDPA's causal kernel needs no mask and holds no scores, while a
        chunk on top of a cache takes the masked math path, which was up to a third slower at 6k tokens.
        """
        size = PREFILL_CHUNK
        if not self._cache_ids and self.loaded.model.device.type == "cpu":
            size = max(len(ids), 1)
        try:
            for start in range(0, len(ids), size):
                chunk = ids[start : start + size]
                logits = forward(self.loaded.model, self._cache, chunk)
                self._cache_ids.extend(chunk)
        except BaseException:
            # A failed forward may have updated some layers and not others: don't trust the cache again.
            self._cache = None
            self._cache_ids = []
            raise
        return logits
