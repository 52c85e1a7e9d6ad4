"""The pieces of one turn: a forward pass over new tokens, sampling, and streaming detokenization."""

from __future__ import annotations

import torch


def forward(model, cache, ids: list[int]) -> torch.Tensor:
    """Run ids through the model on top of cache; the float32 logits of the last position, shape (1, vocab).

    logits_to_keep=1 spares computing vocabulary logits for every prefill position.
    """
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()


class Sampler:
    """Greedy when temperature <= 0, else temperature + nucleus (top_p) sampling, seeded when asked."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, device="cpu"):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = temperature
        self.top_p = top_p
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator(device=device)
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(logits.argmax(dim=-1).item())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order.gather(-1, choice).item())
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


class StreamDecoder:
    """Turns token ids into text deltas without splitting multi-byte characters.

    Decodes a short window that starts a few tokens back, so tokenizers that merge or strip spaces at
    token boundaries still give the right text; a delta ending in U+FFFD (half a UTF-8 character) waits
    for the next token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.emitted = ""

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
        self.emitted += delta
        return delta

    @property
    def text(self) -> str:
        return self._decode(self.ids)

    def finish(self) -> str:
        """Whatever is still held back; afterwards emitted == text."""
        full = self.text
        delta = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += delta
        return delta
