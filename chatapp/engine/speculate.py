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
        reason = yield from _settle(emitted, len(draft), drafter, drop, stop, gate, tally)
        token = emitted[-1]


def _settle(emitted: list[int], drafted: int, drafter, drop, stop, gate: Gate, tally: Tally):
    """A verify's outcome: count it, crop the rejected drafts, and yield its tokens with stop's reason until one
    ends the reply; returns that reason. None: all of them are out, and those that entered the cache (all but the
    last) are pushed to the drafter."""
    held = len(emitted) - 1  # drafted tokens accepted, which stay in the cache; the last one is pending
    tally.drafted += drafted
    tally.accepted += held
    gate.record(drafted, held)
    drop(drafted - held)
    for i, token in enumerate(emitted):
        reason = stop(token)
        if reason is not None:
            drop(held - i)  # it ends the reply: it and the accepted tokens after it leave the cache
            yield token, reason
            return reason
        try:
            yield token, None
        except GeneratorExit:
            drop(held - i)  # the caller stopped at it: the same
            raise
    for candidate in emitted[:-1]:
        drafter.push(candidate)
    return None


def stream_ahead(
    logits: torch.Tensor,
    sampler,
    feed: Callable[[list[int] | torch.Tensor], torch.Tensor],
    feed_rows: Callable[[list[int]], torch.Tensor],
    drop: Callable[[int], None],
    stop: Callable[[int], str | None],
    ids: list[int],
    gate: Gate,
    tally: Tally,
    drafter_for: Callable[[list[int]], Drafter] | None,
    *,
    fed: Callable[[int], None],
) -> Iterator[tuple[int, str | None]]:
    """stream for greedy replies on a GPU, one step ahead: the step for token n is launched from its argmax on
    the device before the host reads token n back, so the host's work for a step (launching the CUDA graph,
    dynamo's guards, detokenizing, drafting, the stop checks: ~3 ms for an 8B on an H200) overlaps the device's
    instead of waiting on it (bench/GPU.md: 0.47 of the bandwidth limit read back each token, 0.62 queued).

    Once token n is read, a draft of what follows it is verified on top of the step already running: that step's
    logits judge the first drafted token, one forward of the draft (feed_rows) the rest. The verify's last token
    was chosen on the host, so the step it feeds starts without a read-back. With drafter_for None it never
    drafts: the plain loop one step ahead.

    feed runs ids through the model: a (1, 1) tensor on the device (fed(token) then says which id it was, once
    read) or a list of one known id. Whenever the loop ends (a reason to stop, or the caller closing it), the
    step fed with the last token is dropped, so the cache holds what stream leaves: everything but the last token.
    """
    assert sampler.greedy and sampler.penalty is None, "one step ahead takes the argmax on the device"
    cuda = logits.device.type == "cuda"
    read = torch.empty(1, dtype=torch.long, pin_memory=cuda)
    copied = torch.cuda.Event() if cuda else None
    drafter = None
    pending = None  # a verify's last token, chosen on the host and not yet fed
    upcoming = logits.argmax(dim=-1).view(1, 1)
    while True:
        if pending is None:
            read.copy_(upcoming.view(1), non_blocking=cuda)
            if copied is not None:
                copied.record()
            logits = feed(upcoming)
            upcoming = logits.argmax(dim=-1).view(1, 1)
            if copied is not None:
                copied.synchronize()
            token = int(read[0])
            fed(token)
            reason = stop(token)
            going_on = False
            try:
                yield token, reason
                going_on = reason is None
            finally:
                if not going_on:
                    drop(1)
            if reason is not None:
                return
        else:
            token, pending = pending, None
            logits = feed([token])
            upcoming = logits.argmax(dim=-1).view(1, 1)
        if drafter_for is None:
            continue
        if drafter is None:  # indexed once the first token is out, so time to first token doesn't grow
            drafter = drafter_for(ids[:-1])
        drafter.push(token)
        draft = drafter.draft(sampler)[0] if gate.open() else []
        if not draft:
            gate.rested()
            continue
        emitted = verify(torch.cat([logits, feed_rows(draft)]), draft, sampler)
        if (yield from _settle(emitted, len(draft), drafter, drop, stop, gate, tally)) is not None:
            return
        pending = emitted[-1]
