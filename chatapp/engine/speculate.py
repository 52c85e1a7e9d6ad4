"""Speculative decoding: draft tokens cheaply, verify them in one forward of the model.

The drafts come from the conversation itself (prompt lookup, here) or from a small draft model with the same
tokenizer (draftmodel.py); the verify, the gate and the turn's loop are the same for both.

A reply that quotes the document, repeats code or loops on a phrase continues something already in the ids.
The drafter finds the longest recent n-gram at the end of the ids that occurred before and proposes what
followed it then. One forward over the last sampled token and the draft gives the model's choice at every
drafted position; the longest prefix the sampler agrees with is kept, plus the model's own next token, and
the rest is cropped from the cache. Greedy output is token-identical to plain decoding, and sampled output
has the same distribution (the speculative-sampling acceptance rule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

#: Tokens drafted per verify. A CPU or GPU step at batch size 1 reads every weight once whatever the tokens,
#: so verifying 6 costs little more than decoding 1; more would mostly be the tail of a draft that already
#: went wrong (quotes and code diverge after a few tokens), and each of those costs compute and a crop.
DRAFT_TOKENS = 6
#: The longest n-gram looked up first: 3 tokens pin a quote's place in a document; 1 still catches loops.
LONGEST_NGRAM = 3


class Drafter:
    """The ids of a turn (cache and pending token), indexed by every 1..LONGEST_NGRAM-gram's latest successor."""

    def __init__(self, ids: list[int]):
        self.ids: list[int] = []
        self._next: list[dict[tuple[int, ...], int]] = [{} for _ in range(LONGEST_NGRAM + 1)]
        for token in ids:
            self.push(token)

    def push(self, token: int) -> None:
        at = len(self.ids)
        for n in range(1, min(LONGEST_NGRAM, at) + 1):
            self._next[n][tuple(self.ids[at - n :])] = at
        self.ids.append(token)

    def draft(self, sampler) -> tuple[list[int], torch.Tensor | None]:
        """The drafter interface stream uses (see draftmodel.ModelDrafter): tokens, and None as q, for a
        prompt-lookup draft is certain (a point mass)."""
        return self.propose(), None

    def propose(self, k: int = DRAFT_TOKENS) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of the ids' last n-gram; [] if none."""
        ids = self.ids
        for n in range(min(LONGEST_NGRAM, len(ids) - 1), 0, -1):
            start = self._next[n].get(tuple(ids[-n:]))
            if start is None:
                continue
            draft: list[int] = []
            # Copied as LZ77 does: a match that runs into the end goes on through the draft itself, so a
            # phrase the reply repeats is drafted whole and not just up to where the ids end.
            for i in range(k):
                at = start + i
                draft.append(ids[at] if at < len(ids) else draft[at - len(ids)])
            return draft
        return []


def verify(logits: torch.Tensor, draft: list[int], sampler, q: torch.Tensor | None = None) -> list[int]:
    """The accepted prefix of draft and one token more, from logits (len(draft) + 1, vocab) of one forward.

    Row i is the model's distribution after the draft's first i tokens. Greedy: a drafted token is kept
    when it is the sampler's own choice. Sampling: row i of q is the distribution the drafter drew token i
    from (None: each drafted token was certain, a point mass, as prompt lookup's are). Token x is kept with
    probability min(1, p(x) / q(x)), and on rejection the next token is drawn from max(0, p - q),
    renormalised; either way each emitted token is distributed as the sampler's p (speculative sampling,
    Leviathan et al. 2023).
    """
    out: list[int] = []
    for i, token in enumerate(draft):
        row = logits[i : i + 1]
        if sampler.greedy:
            choice = sampler(row)
            if choice != token:
                return [*out, choice]
        else:
            p = sampler.distribution(row)[0]
            if q is None:
                drafted = torch.zeros_like(p)
                drafted[token] = 1.0
            else:
                drafted = q[i].to(p.device, p.dtype)
            u = torch.rand((), generator=sampler.generator, device=p.device)
            if u * drafted[token] >= p[token]:
                rest = (p - drafted).clamp(min=0.0)
                if not rest.sum() > 0:  # p and q equal up to rounding: a rejection is all but impossible
                    rest = p
                choice = torch.multinomial(rest / rest.sum(), 1, generator=sampler.generator)
                return [*out, int(choice.item())]
        out.append(token)
    return [*out, sampler(logits[len(draft) :])]


class Gate:
    """Drafting stays on while it pays, over a window of recent drafts; when it doesn't, it rests a while.

    A verify of 1 + DRAFT_TOKENS tokens yields 1 + accepted tokens for the price of `cost` plain steps, so it
    pays from (cost - 1) / DRAFT_TOKENS of drafted tokens accepted; the threshold is a little above that, as
    drafts are often shorter than DRAFT_TOKENS. On SmolLM2-135M in fp32 on a 2-core CPU the cost was about 1.6
    at 300 tokens of context and 2.3 at 2,000 (a busy machine): COST. bf16 weights with fp32 math cost more
    (bf16_weights.VERIFY_COST). WINDOW drafted tokens (about 8 drafts) keeps one bad draft from ending it;
    REST tokens later it tries again, as a reply may move on to quoting.
    """

    WINDOW = 48
    REST = 64
    COST = 2.3

    def __init__(self, cost: float = COST):
        self.threshold = (cost - 1) / DRAFT_TOKENS + 0.03
        self._recent: list[tuple[int, int]] = []
        self._resting = 0

    def open(self) -> bool:
        return self._resting == 0

    def rested(self) -> None:
        """One token decoded plainly."""
        self._resting = max(self._resting - 1, 0)

    def record(self, drafted: int, accepted: int) -> None:
        self._recent.append((drafted, accepted))
        while sum(d for d, _ in self._recent[1:]) >= self.WINDOW:
            self._recent.pop(0)
        total = sum(d for d, _ in self._recent)
        if total >= self.WINDOW and sum(a for _, a in self._recent) < self.threshold * total:
            self._recent.clear()
            self._resting = self.REST


@dataclass
class Tally:
    drafted: int = 0
    accepted: int = 0


def stream(
    logits: torch.Tensor,
    sampler,
    feed: Callable[[int], torch.Tensor],
    feed_rows: Callable[[list[int]], torch.Tensor],
    drop: Callable[[int], None],
    stop: Callable[[int], str | None],
    ids: list[int],
    gate: Gate,
    tally: Tally,
    drafter_for: Callable[[list[int]], Drafter] = Drafter,
) -> Iterator[tuple[int, str | None]]:
    """generate.stream with drafts: yields each token with stop's reason, and ends at the first reason.

    feed runs one token into the cache, feed_rows several (the logits of every position), drop forgets
    the cache's last n tokens. ids are the ones the cache holds; they are indexed for drafts only after the
    first token is out, so a long chat's time to first token doesn't grow. As in generate.stream, the last
    token yielded is never in the cache: when stop ends the reply inside a verified run, or the caller stops
    iterating (close), the accepted tokens from there on are cropped too. stop is asked about each token
    just before it is yielded, so a cancel acts at the next token, as without drafts. drafter_for makes the
    turn's drafter from those ids: prompt lookup (Drafter), or a draft model (draftmodel.ModelDrafter.follow);
    either is pushed every token that enters the ids and gives draft(sampler) -> (tokens, q).
    """
    token = sampler(logits)
    reason = stop(token)
    yield token, reason
    if reason is not None:
        return
    drafter = drafter_for(ids)
    while reason is None:
        drafter.push(token)
        draft, q = drafter.draft(sampler) if gate.open() else ([], None)
        if not draft:
            gate.rested()
            token = sampler(feed(token))
            reason = stop(token)
            yield token, reason
            continue
        emitted = verify(feed_rows([token, *draft]), draft, sampler, q)
        held = len(emitted) - 1  # drafted tokens accepted, which stay in the cache; the last one is pending
        tally.drafted += len(draft)
        tally.accepted += held
        gate.record(len(draft), held)
        drop(len(draft) - held)
        for i, token in enumerate(emitted):
            reason = stop(token)
            if reason is not None:
                drop(held - i)  # it ends the reply: it and the accepted tokens after it leave the cache
                yield token, reason
                return
            try:
                yield token, None
            except GeneratorExit:
                drop(held - i)  # the caller stopped at it: the same
                raise
        for candidate in emitted[:-1]:
            drafter.push(candidate)
