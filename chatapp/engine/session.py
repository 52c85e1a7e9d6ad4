"""ChatSession: a conversation, its one KV cache, and the exact ids that cache holds."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import replace

import torch

from ..errors import ContextOverflow
from ..protocol import Message, TurnStats
from ..sampling import DEFAULTS, SamplingParams
from . import bf16_weights, kvcache, reasoning, speculate, static_decode
from .draftmodel import ModelDrafter, check_draft
from .generate import GenerationResponse, ReplyText, Sampler, StreamDecoder, decode_step, forward, prefill, stream
from .loader import LoadedModel


def render_ids(tokenizer, messages: list[Message], thinking: bool | None = None) -> list[int]:
    """The whole conversation through the chat template, ready for the next assistant reply.

    thinking goes to a template that has the switch (Qwen3's enable_thinking); None leaves the template's default.

    It starts with the tokenizer's BOS exactly once when the tokenizer puts one before text: templates that
    write it themselves keep theirs, and a model without a template (chatapp's plain one has no BOS) gets it.
    Messages are tokenized as text: a control token's spelling typed or pasted into one (`<|im_end|>`) stays
    text, so it can't forge a turn; only the template's own markers are control tokens.
    """
    control = _control_pattern(tokenizer)
    marked = {i: f"\ue000{i}\ue001" for i, m in enumerate(messages) if control and control.search(m.content)}
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": marked.get(i, m.content)} for i, m in enumerate(messages)],
        tokenize=False,
        add_generation_prompt=True,
        **reasoning.template_options(tokenizer, thinking),
    )
    ids: list[int] = []
    start = 0
    # Only a conversation with such a message is tokenized in pieces; any other is tokenized whole, as before.
    for match in _PLACEHOLDER.finditer(text) if marked else ():
        ids += tokenizer(text[start : match.start()], add_special_tokens=False)["input_ids"]
        content = messages[int(match.group(1))].content
        ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        start = match.end()
    ids += tokenizer(text[start:], add_special_tokens=False)["input_ids"]
    bos = leading_bos(tokenizer)
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


def _control_pattern(tokenizer) -> re.Pattern | None:
    """A regex of the tokenizer's control tokens' spellings (added tokens marked special), cached on it."""
    cached = getattr(tokenizer, "_chatapp_control", False)
    if cached is not False:
        return cached
    spellings = sorted(
        (t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content), key=len, reverse=True
    )
    pattern = re.compile("|".join(map(re.escape, spellings))) if spellings else None
    tokenizer._chatapp_control = pattern
    return pattern


def leading_bos(tokenizer) -> int | None:
    """The BOS id this tokenizer puts before any text by itself, which the model then expects; else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def common_prefix_len(a: list, b: list) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _fit(
    tokenizer, messages: list[Message], dropped: int, room: int, context: int, thinking: bool | None = None
) -> tuple[list[int], int]:
    """The rendered ids, after dropping the oldest user/assistant pairs (never the system prompt) until they
    fit with `room` tokens to spare; and how many non-system messages are dropped in all."""
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    while True:
        ids = render_ids(tokenizer, system + rest[dropped:], thinking)
        if len(ids) + room <= context:
            return ids, dropped
        kept = rest[dropped:]
        step = 2 if len(kept) > 1 and kept[0].role == "user" and kept[1].role == "assistant" else 1
        if len(kept) - step < 1:
            raise ContextOverflow(
                f"the message needs {len(ids)} tokens plus {room} for the reply, "
                f"more than the {context}-token context; shorten it or lower max_new_tokens"
            )
        dropped += step


class ChatSession:
    """One conversation and its KV cache; `reply_to` is the one way to run a turn.

    The caller passes the whole conversation every turn (a regenerate or an edit is just another list).
    The session renders it, keeps the cache up to the first token that differs from what the cache holds,
    prefills only the rest and streams the reply. Greedy replies are token-identical to a full re-encode.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        context_length: int | None = None,
        speculative: str | None = None,
        draft: LoadedModel | None = None,
        decode: str = "auto",
        ahead: bool | None = None,
    ):
        draft = draft or loaded.draft
        speculative = speculative or ("draft" if draft is not None else "ngram")
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)}, got {speculative!r}")
        if speculative == "draft" and draft is None:
            raise ValueError("speculative 'draft' needs a draft model (draft=...)")
        if decode not in DECODE:
            raise ValueError(f"decode must be one of {', '.join(DECODE)}, got {decode!r}")
        self.loaded = loaded
        #: Whether turns run on a static cache (static_decode): "auto" takes it where the loader chose it.
        self.static = loaded.decode_path == "static" if decode == "auto" else decode == "static"
        if self.static and (why := static_decode.unsupported(loaded.model)):
            raise ValueError(f"no static decode path: {why}")
        self.context_length = context_length or loaded.context_length
        #: Greedy replies on the static path decode one step ahead (speculate.stream_ahead); None: on a GPU, where it
        #: overlaps the host's work with the device's (on a CPU it only costs a dropped step per reply).
        self.ahead = self.static and (loaded.model.device.type == "cuda" if ahead is None else ahead)
        #: "ngram": prompt-lookup drafts while they pay (see speculate.Gate); "draft": a draft model's, likewise;
        #: "off": one token per step. Default: the loaded model's draft when it has one, else ngram.
        self.speculative = speculative
        self._drafter: ModelDrafter | None = None
        if speculative == "draft":
            check_draft(loaded, draft)
            self._drafter = ModelDrafter(draft, loaded.model.get_output_embeddings().weight.shape[0])
        mixed = bf16_weights.applied(loaded.model)
        self._gate = speculate.Gate(bf16_weights.VERIFY_COST if mixed else speculate.Gate.COST)
        #: The conversation as of the last turn, its reply included.
        self.messages: list[Message] = []
        #: Non-system messages dropped from the front of the context to make the conversation fit.
        self.dropped_messages = 0
        self._cache = None
        self._cache_ids: list[int] = []
        #: One line about the cache for the turn being answered (a rebuild, a restore), or "".
        self.note = ""
        self._rebuilt = False
        self._last_prompt: list[int] = []
        self._restored: tuple[int, float] | None = None
        self._pending_note = ""

    # -- what the cache holds -------------------------------------------------------------

    @property
    def cache_ids(self) -> tuple[int, ...]:
        return tuple(self._cache_ids)

    @property
    def cache_tokens(self) -> int:
        return len(self._cache_ids)

    def cache_bytes(self) -> int:
        """Bytes the KV cache holds now (the draft model's included)."""
        return kvcache.nbytes(self._cache) + (self._drafter.nbytes() if self._drafter else 0)

    def export(self) -> tuple[list[int], dict, list[int]]:
        """The cache ids, and the cache as kvcache.tensors gives it, for a snapshot (empty when there is none)."""
        if self._cache is None or not self._cache_ids:
            return [], {}, []
        named, seen = kvcache.tensors(self._cache)
        return list(self._cache_ids), named, seen

    def adopt(self, cache, ids: list[int], restored_s: float) -> None:
        """Take a cache restored from a snapshot; the next turn reuses it up to the first id that differs."""
        self._cache, self._cache_ids = cache, list(ids)
        self._restored = (len(ids), restored_s)

    def preview_ids(self, messages: list[Message], room: int, thinking: bool | None = None) -> list[int]:
        """The ids a turn on `messages` would render, older turns dropped to fit as reply_to drops them
        (thinking as reply_to takes it: the switch changes what a reasoning template renders)."""
        try:
            return _fit(self.loaded.tokenizer, messages, 0, room, self.context_length, thinking)[0]
        except ContextOverflow:
            return render_ids(self.loaded.tokenizer, messages, thinking)

    def move_to(self, device) -> None:
        """Move the cache to another device (parking a GPU cache in CPU RAM, and back)."""
        if self._cache is not None:
            kvcache.move(self._cache, device)
        if self._drafter is not None:
            self._drafter.move_to(device)

    def tell(self, note: str) -> None:
        """A line about the cache for the next turn's stats (e.g. a snapshot that had to be ignored)."""
        self._pending_note = note

    def copy(self) -> ChatSession:
        """An independent session with this conversation and its own copy of the KV cache: a branch starts warm.

        The copy's next turn crops the cache to what the branch shares with this conversation, as any turn
        does, so only what the branch adds is prefilled; this session and its cache go on untouched.
        """
        twin = ChatSession(
            self.loaded,
            context_length=self.context_length,
            speculative=self.speculative,
            draft=self._drafter.loaded if self._drafter else None,
            decode="static" if self.static else "dynamic",
        )
        if self._drafter is not None:
            twin._drafter = self._drafter.copy()
        twin.messages = [replace(m) for m in self.messages]
        twin.dropped_messages = self.dropped_messages
        twin._cache = deepcopy(self._cache)
        twin._cache_ids = list(self._cache_ids)
        twin._last_prompt = list(self._last_prompt)
        return twin

    def context_messages(self) -> list[Message]:
        """What the model sees: the system prompt and the messages that still fit the context."""
        system = [m for m in self.messages if m.role == "system"]
        rest = [m for m in self.messages if m.role != "system"]
        return system + rest[self.dropped_messages :]

    def _rewind(self, keep: int, settle: bool = True) -> int:
        """Crop the cache to its first `keep` ids; returns how many it holds after (0 if it had to be rebuilt).

        settle ends the sliding layers' room to roll back into the last turn (see kvcache); a regenerate keeps
        it, so an edit of the message it answered still reuses the cache.
        """
        drop = len(self._cache_ids) - keep
        if self._cache is not None and keep > 0 and drop >= 0 and kvcache.can_drop(self._cache, drop):
            kvcache.drop(self._cache, drop)
            del self._cache_ids[keep:]
            if settle:
                kvcache.settle(self._cache)
            return keep
        if self._cache is not None and keep > 0 and not self._rebuilt:
            # Once per chat: the reason its turns cost more than the new message.
            self._rebuilt = True
            self.note = (
                f"this model's cache could not roll back {drop} tokens, so it re-read the conversation; "
                "that is counted as prefill"
            )
        self._cache = None  # _feed makes the new one, of the kind this session decodes on
        self._cache_ids = []
        return 0

    def _feed(self, ids: list[int] | torch.Tensor, rows: bool = False) -> torch.Tensor:
        """Run ids into the cache, keeping _cache_ids in step with it; rows: the logits of every position.

        ids may be one token the host hasn't read yet, a (1, 1) tensor on the device (stream_ahead, on the static
        path). Its id in _cache_ids is -1 until _fed says which it was: should that never come (a CUDA error), the
        next turn sees an id no prompt has, and rolls the cache back to before it.
        """
        model = self.loaded.model
        ahead = isinstance(ids, torch.Tensor)
        known = [-1] if ahead else ids
        if self.static:
            width = max(len(known), static_decode.VERIFY_WIDTH) if rows else len(known)
            self._cache = static_decode.holding(self._cache, model.config, len(self._cache_ids) + width)
        elif self._cache is None:
            self._cache = kvcache.new_cache(model.config)
        try:
            if rows and self.static:
                logits = static_decode.rows(self.loaded, self._cache, ids)
            elif rows:
                logits = forward(model, self._cache, ids, rows=len(ids))
            elif len(known) > 1:
                logits = prefill(model, self._cache, ids)
            elif self.static:
                logits = static_decode.step(self.loaded, self._cache, ids if ahead else ids[0])
            else:
                logits = decode_step(model, self._cache, ids if ahead else ids[0])
        except BaseException:
            # A failed forward may have updated some layers and not others: don't trust the cache again.
            self._cache = None
            self._cache_ids = []
            raise
        self._cache_ids.extend(known)
        return logits

    # -- one turn -------------------------------------------------------------------------

    def reply_to(
        self,
        messages: list[Message],
        params: SamplingParams = DEFAULTS,
        cancel: threading.Event | None = None,
        thinking: bool | None = None,
        stop: tuple[str, ...] = (),
    ) -> Iterator[GenerationResponse]:
        """Answer the last message of `messages` (the user's): a stream of GenerationResponse.

        thinking switches a reasoning model's thinking on or off where its template can (None: its default).
        stop adds stop strings to the model's own for this reply (an API client's `stop`).

        Setting `cancel` stops the reply after the token being made; the partial reply is kept, marked cut.
        A conversation that can't fit even without its history raises ContextOverflow here, and the session
        stays as it was.
        """
        started = time.perf_counter()
        if not messages or messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        same = common_prefix_len([(m.role, m.content) for m in self.messages], [(m.role, m.content) for m in messages])
        dropped = min(self.dropped_messages, sum(1 for m in messages[:same] if m.role != "system"))
        ids, dropped_now = _fit(
            self.loaded.tokenizer, messages, dropped, params.max_new_tokens, self.context_length, thinking
        )
        self.messages = list(messages)
        self.dropped_messages = dropped_now
        return self._turn(ids, dropped_now - dropped, params, cancel or threading.Event(), started, tuple(stop))

    def _turn(
        self,
        ids: list[int],
        trimmed: int,
        params: SamplingParams,
        cancel: threading.Event,
        started: float,
        stop_strings: tuple[str, ...] = (),
    ) -> Iterator[GenerationResponse]:
        loaded = self.loaded
        self.note, self._pending_note = self._pending_note, ""
        keep = self._rewind(min(common_prefix_len(ids, self._cache_ids), len(ids) - 1), ids != self._last_prompt)
        self._last_prompt = ids
        decoder = StreamDecoder(loaded.tokenizer)
        reply = ReplyText(loaded.stop_strings + stop_strings)
        sampled: list[int] = []
        times: list[float] = []

        def stop(token: int) -> str | None:
            sampled.append(token)
            times.append(time.perf_counter())
            if token in loaded.stop_token_ids:
                return "stop"
            reply.add(decoder.push(token))
            if reply.stopped:
                return "stop"
            if len(sampled) >= params.max_new_tokens:
                return "length"
            return "cancelled" if cancel.is_set() else None

        finish = None
        tally = speculate.Tally()
        try:
            with torch.inference_mode():
                logits = self._feed(ids[keep:])
                sampler = Sampler(params, loaded.model.device, self._cache_ids)
                # A penalty's ids would have to include each row's drafts: such replies decode plainly.
                drafts = self.speculative != "off" and not params.penalised and kvcache.rewindable(self._cache)
                drafter_for = (self._drafter.follow if self._drafter else speculate.Drafter) if drafts else None
                rest = (self._feed_rows, self._drop, stop, self._cache_ids, self._gate, tally, drafter_for)
                if self.ahead and params.greedy and not params.penalised:
                    tokens = speculate.stream_ahead(logits, sampler, self._feed, *rest, fed=self._fed)
                elif drafter_for is not None:
                    tokens = speculate.stream(logits, sampler, self._feed_one, *rest)
                else:
                    tokens = stream(logits, sampler, self._feed_one, stop)
                try:
                    for token, reason in tokens:
                        finish = reason
                        yield GenerationResponse(reply.take(), token)
                finally:
                    tokens.close()  # here, in inference mode: a speculative stream crops the cache as it closes
            reply.add(decoder.finish())
        finally:
            # Runs on normal end, on cancel, and when the caller stops iterating (GeneratorExit):
            # the partial reply is kept, marked as cut, and the cache still matches _cache_ids.
            self.messages.append(Message("assistant", reply.text, cut=finish in (None, "cancelled")))
        if trimmed and finish in ("stop", "length"):
            finish = "overflow-trimmed"
        if self._restored and not self.note:
            tokens, seconds = self._restored
            self.note = f"restored {tokens:,} tokens from disk in {seconds:.2f} s; prefilled {len(ids) - keep:,}"
        self._restored = None
        decode_s = times[-1] - times[0] if times else 0.0
        stats = TurnStats(
            prompt_tokens=len(ids),
            prefilled_tokens=len(ids) - keep,
            generated_tokens=len(sampled),
            ttft_s=(times[0] if times else time.perf_counter()) - started,
            decode_tokens_per_s=(len(sampled) - 1) / decode_s if decode_s > 0 else 0.0,
            cache_tokens=len(self._cache_ids),
            finish_reason=finish,
            trimmed_messages=trimmed,
            dropped_messages=self.dropped_messages,
            cache_note=self.note,
            drafted_tokens=tally.drafted,
            accepted_tokens=tally.accepted,
            thinking_tokens=reasoning.thinking_tokens(
                sampled, reasoning.marker_ids(loaded.tokenizer), reasoning.opens_block(loaded.tokenizer, ids)
            ),
        )
        yield GenerationResponse(reply.take(final=True), finish_reason=finish, stats=stats)

    def _feed_one(self, token: int) -> torch.Tensor:
        return self._feed([token])

    def _fed(self, token: int) -> None:
        self._cache_ids[-1] = token

    def _feed_rows(self, tokens: list[int]) -> torch.Tensor:
        return self._feed(tokens, rows=True)

    def _drop(self, tokens: int) -> None:
        """Forget the cache's last `tokens` (drafts that were rejected)."""
        if not tokens:
            return
        if not kvcache.can_drop(self._cache, tokens):
            self._cache, self._cache_ids = None, []  # the next turn re-reads the chat
            raise RuntimeError(f"the KV cache could not forget {tokens} rejected draft tokens")
        kvcache.drop(self._cache, tokens)
        del self._cache_ids[-tokens:]


#: The values of ChatSession's speculative option.
SPECULATIVE = ("ngram", "draft", "off")
#: The values of ChatSession's decode option: the loader's choice, or one cache kind.
DECODE = ("auto", "dynamic", "static")
