"""The pieces of one turn, gpt-fast style: `prefill`, `decode_step`, and `stream`, the decode loop.

Also sampling, streaming detokenization, and GenerationResponse, the one type a streamed reply is made of.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..planner import PREFILL_CHUNK
from ..protocol import TurnStats
from ..sampling import SamplingParams


@dataclass
class GenerationResponse:
    """One item of a streamed reply, as mlx-lm's: the text it adds and the token sampled.

    The last item of a reply has no token; it carries whatever text was still held back, the finish_reason
    (stop, length, cancelled or overflow-trimmed) and the turn's stats.
    """

    text: str
    token: int | None = None
    finish_reason: str | None = None
    stats: TurnStats | None = None


def forward(model, cache, ids: list[int], rows: int = 1) -> torch.Tensor:
    """Run ids through the model on top of cache; the float32 logits of the last `rows` positions, (rows, vocab).

    logits_to_keep spares computing vocabulary logits for every prefill position; a speculative verify
    keeps one row per drafted position.
    """
    return run(model, cache, torch.tensor([ids], dtype=torch.long, device=model.device), rows)


def run(model, cache, input_ids: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """forward for ids already on the model's device, shaped (1, n)."""
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=rows)
    return out.logits[0, -rows:, :].float()


def prefill(model, cache, ids: list[int]) -> torch.Tensor:
    """Run a prompt's new ids into the cache, in chunks of PREFILL_CHUNK tokens; the logits after the last one.

    Chunks bound activation memory (the planner counts on it). Except into an empty cache on a CPU: there
    SDPA's causal kernel needs no mask and holds no scores, while a chunk on top of a cache takes the masked
    math path, which was up to a third slower at 6k tokens. Eager attention (Gemma 2's) holds the scores of
    every call, so a whole 8k prompt would hold heads x 8k x 8k of them: it is chunked there too.
    """
    size = PREFILL_CHUNK
    eager = model.config._attn_implementation == "eager"
    if cache.get_seq_length() == 0 and model.device.type == "cpu" and not eager:
        size = max(len(ids), 1)
    for start in range(0, len(ids), size):
        logits = forward(model, cache, ids[start : start + size])
    return logits


def decode_step(model, cache, token: int | torch.Tensor) -> torch.Tensor:
    """One sampled token into the cache; the logits for the next one. The token may be a (1, 1) tensor on the
    model's device, which speculate.stream_ahead feeds before the host has read it."""
    if isinstance(token, torch.Tensor):
        return run(model, cache, token)
    return forward(model, cache, [token])


def stream(
    logits: torch.Tensor,
    sample: Callable[[torch.Tensor], int],
    feed: Callable[[int], torch.Tensor],
    stop: Callable[[int], str | None],
) -> Iterator[tuple[int, str | None]]:
    """The decode loop: sample a token, yield it with stop's reason to end (None: go on), feed it back.

    The token that ends the loop is never fed, so the cache holds everything but the reply's last token.
    """
    while True:
        token = sample(logits)
        reason = stop(token)
        yield token, reason
        if reason is not None:
            return
        logits = feed(token)


class Sampler:
    """Greedy when temperature <= 0, else sampled through transformers' own warpers (temperature, top_k, top_p,
    min_p, in generate()'s order), seeded when asked. A repetition penalty applies to both, over `history`: the
    list of ids before the token being chosen, which the caller keeps growing."""

    def __init__(self, params: SamplingParams, device="cpu", history: list[int] | None = None):
        self.temperature = params.temperature
        self.greedy = params.greedy
        self.history = history if history is not None else []
        self.penalty = RepetitionPenaltyLogitsProcessor(params.repetition_penalty) if params.penalised else None
        self.warpers: list = []
        self.generator = None
        if not params.greedy:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
            if params.min_p:
                self.warpers.append(MinPLogitsWarper(params.min_p))
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.reshape(-1, logits.shape[-1]).float()
        if self.penalty is not None:
            ids = torch.tensor([self.history], dtype=torch.long, device=scores.device)
            scores = self.penalty(ids.expand(scores.shape[0], -1), scores)
        for warper in self.warpers:
            scores = warper(None, scores)
        return scores

    def __call__(self, logits: torch.Tensor) -> int:
        if self.greedy:
            scores = self._scores(logits) if self.penalty is not None else logits
            return int(scores.argmax(dim=-1).item())
        return int(torch.multinomial(self.distribution(logits), 1, generator=self.generator).item())

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities __call__ samples from when not greedy, a row per row of logits: what a verify
        accepts by."""
        return torch.softmax(self._scores(logits), dim=-1)


class StreamDecoder:
    """Turns token ids into text deltas without splitting multi-byte characters.

    Decodes a short window that starts a few tokens back, so tokenizers that merge or strip spaces at
    token boundaries still give the right text; a delta ending in U+FFFD (half a UTF-8 character) waits
    for the next token. `text` is what was emitted so far, kept rather than decoded again on every call.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Whatever is still held back; afterwards text is the whole reply."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        delta = after[len(before) :] if len(after) > len(before) else ""
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


class ReplyText:
    """A reply's text as it streams, cut at the first stop string.

    Text that could be the start of a stop string is held back until the next delta shows it isn't, so the
    streamed text and the stored reply are the same, and "\\nUser:" never leaks its newline.
    """

    def __init__(self, stop_strings: tuple[str, ...] = ()):
        self.stop_strings = stop_strings
        self.text = ""
        self.stopped = False
        self._shown = 0

    def add(self, delta: str) -> None:
        if self.stopped or not delta:
            return
        # Only the tail can hold a new match: the old text was searched already.
        start = max(0, len(self.text) - max((len(s) for s in self.stop_strings), default=0) + 1)
        self.text += delta
        found = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def _held(self) -> int:
        """Length of the longest tail of text that begins some stop string."""
        return max(
            (
                k
                for s in self.stop_strings
                for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                if self.text.endswith(s[:k])
            ),
            default=0,
        )

    def take(self, final: bool = False) -> str:
        """The text not handed out yet; final hands out the held-back tail too."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        out = self.text[self._shown : end]
        self._shown = max(self._shown, end)
        return out
