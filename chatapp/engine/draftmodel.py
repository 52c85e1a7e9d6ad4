"""A draft model for speculative decoding: a small model with the target's tokenizer proposes the next tokens.

It keeps its own KV cache of the conversation, which follows the target's ids the way the target's cache
does: each draft first crops what the two no longer share (rejected drafts, a rewritten reply) and runs in
only the ids it lacks, then samples a few tokens one by one. The target verifies them all in one forward
(speculate.stream), so the draft model changes how fast a reply comes, never which reply.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import torch

from .. import planner
from ..errors import ChatappError, ModelLoadError
from . import kvcache
from .generate import forward, prefill
from .speculate import DRAFT_TOKENS


def check_draft(target, draft) -> None:
    """Refuse, in one line, a draft whose tokens don't mean what the target's mean: its proposals would be noise,
    and the ids it is fed would be read as other words."""
    ours, theirs = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if ours == theirs:
        return
    if len(ours) != len(theirs):
        why = f"its vocabulary has {len(theirs):,} tokens, the model's {len(ours):,}"
    else:
        token = next(t for t in sorted(ours) if ours[t] != theirs.get(t))
        why = f"token {token!r} is id {theirs.get(token)} there and {ours[token]} here"
    raise ModelLoadError(
        f"'{draft.source.label}' can't draft for '{target.source.label}': its tokenizer differs ({why})"
    )


def resolve_draft(source, draft: str | None, settings) -> tuple[object | None, object | None, str]:
    """The draft a load asks for, as (its ModelSource, its ModelFacts, ""), or (None, None, why there is none).

    draft is a model reference, "none", or None for what the model's catalog entry names. A draft the catalog
    names is used only once it is downloaded: loading a model never fetches a second one the user didn't ask for.
    """
    from ..catalog import load_catalog
    from ..facts import facts_for
    from ..refs import parse_ref

    ref = draft if draft is not None else (source.spec.draft if source.spec else None)
    if not ref or ref == "none":
        return None, None, ""
    try:
        found = parse_ref(ref, load_catalog(settings.config_dir / "models.toml"))
        if draft is None and not _downloaded(found):
            return None, None, f"no draft: {ref} isn't downloaded (`chatapp pull {ref}` lets it draft, faster replies)"
        return found, facts_for(found), ""
    except ChatappError as exc:
        return None, None, f"no draft: {exc}"


def _downloaded(source) -> bool:
    if source.kind != "hub":
        return True  # a folder or a GGUF file is here, or its load says what is wrong
    from huggingface_hub import snapshot_download

    from ..hub import folder_missing

    try:
        folder = snapshot_download(source.repo_id, revision=source.revision, local_files_only=True)
    except Exception:  # huggingface_hub's "not in the cache" comes as several error types
        return False
    return folder_missing(Path(folder)) is None


def attach_draft(
    loaded,
    source,
    plan: planner.Plan | None,
    settings,
    device: str,
    on_status: Callable[[str], None] | None,
    on_progress: Callable | None,
) -> None:
    """Load the draft beside `loaded` when the plan says both fit, as loaded.draft; a note says what happened."""
    from .loader import load_model

    if plan is not None and plan.draft is not None and not plan.draft.fits:
        loaded.notes.append(planner.describe_draft(plan))
        return
    preset = loaded.preset if loaded.preset in planner.DTYPE_BYTES else loaded.dtype
    try:
        draft = load_model(
            source,
            preset,
            settings=settings,
            device=device,
            context=loaded.context_length,
            draft="none",
            on_status=on_status,
            on_progress=on_progress,
        )
        check_draft(loaded, draft)
    except ChatappError as exc:
        loaded.notes.append(f"no draft: {exc}")
        return
    loaded.draft = draft
    loaded.notes.append(f"drafting with {source.label} ({preset}) for speculative decoding")


def _fit_vocab(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Logits over the target's vocabulary: embedding tables are padded to different sizes (Qwen2.5 0.5B has
    151,936 rows, 7B 152,064) past the tokenizer's own ids, so columns past either are never a token."""
    if logits.shape[-1] >= size:
        return logits[..., :size]
    pad = logits.new_full((*logits.shape[:-1], size - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class ModelDrafter:
    """A draft model's cache of one conversation and the ids it holds; one per ChatSession, kept across turns."""

    def __init__(self, draft, vocab_size: int, k: int = DRAFT_TOKENS):
        self.loaded = draft
        self.vocab_size = vocab_size
        self.k = k
        self.cache = None
        self.cache_ids: list[int] = []
        #: The target's ids this turn (its cache and the pending token), pushed as they come.
        self.ids: list[int] = []
        self._settle = False

    def follow(self, ids: list[int]) -> ModelDrafter:
        """Start a turn on the target's ids (speculate.stream's drafter_for)."""
        self.ids = list(ids)
        # As the target does at a turn's start: sliding layers go back to their window, keeping room to roll
        # back only within this turn.
        self._settle = True
        return self

    def push(self, token: int) -> None:
        self.ids.append(token)

    def copy(self) -> ModelDrafter:
        twin = ModelDrafter(self.loaded, self.vocab_size, self.k)
        twin.cache, twin.cache_ids = deepcopy(self.cache), list(self.cache_ids)
        return twin

    def move_to(self, device) -> None:
        if self.cache is not None:
            kvcache.move(self.cache, device)

    def nbytes(self) -> int:
        return kvcache.nbytes(self.cache)

    def draft(self, sampler) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens the draft model samples after the ids, with the same rule as the target's sampler;
        and q, the distributions they were drawn from (None when greedy: each was certain)."""
        if len(self.ids) + self.k > self.loaded.context_length:
            return [], None  # past the draft model's own context its guesses are worthless
        try:
            logits = self._sync()
            tokens: list[int] = []
            rows: list[torch.Tensor] = []
            for i in range(self.k):
                logits = _fit_vocab(logits, self.vocab_size)
                if sampler.greedy:
                    token = int(logits.argmax(dim=-1).item())
                else:
                    q = sampler.distribution(logits.to(sampler.generator.device))
                    token = int(torch.multinomial(q, 1, generator=sampler.generator).item())
                    rows.append(q[0])
                tokens.append(token)
                if i + 1 < self.k:
                    logits = self._feed([token])
        except BaseException:
            # A failed forward may have updated some layers and not others: start this cache over next time.
            self.cache, self.cache_ids = None, []
            raise
        return tokens, (torch.stack(rows) if rows else None)

    def _sync(self) -> torch.Tensor:
        """Crop the cache to what it shares with the ids and run in the rest; the logits after the last id."""
        from .session import common_prefix_len

        keep = min(common_prefix_len(self.cache_ids, self.ids), len(self.ids) - 1)
        drop = len(self.cache_ids) - keep
        if self.cache is not None and keep > 0 and kvcache.can_drop(self.cache, drop):
            kvcache.drop(self.cache, drop)
            del self.cache_ids[keep:]
        else:
            self.cache, self.cache_ids = kvcache.new_cache(self.loaded.model.config), []
        if self._settle:
            kvcache.settle(self.cache)
            self._settle = False
        return self._feed(self.ids[len(self.cache_ids) :])

    def _feed(self, ids: list[int]) -> torch.Tensor:
        model = self.loaded.model
        logits = prefill(model, self.cache, ids) if len(ids) > 1 else forward(model, self.cache, ids)
        self.cache_ids.extend(ids)
        return logits
