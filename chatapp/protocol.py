"""Plain dataclasses passed between the engine and its callers, and between the UI and the worker process.

They cross a multiprocessing pipe, so they hold only picklable builtins, and this module imports nothing
heavy: the UI imports it without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .sampling import SamplingParams


@dataclass
class Message:
    """One message of a conversation, as the engine and a remote backend take it."""

    role: str
    content: str
    #: A reply that was stopped (cancel) before it finished.
    cut: bool = False


@dataclass
class TurnStats:
    """What one turn cost: the prompt, how much of it ran through the model, the reply, and how fast."""

    #: Length of the rendered conversation the reply was conditioned on.
    prompt_tokens: int
    #: Tokens run through the model before the first new token (history reused from the cache is not counted).
    prefilled_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    #: Tokens held in the KV cache when the turn ended.
    cache_tokens: int
    #: stop, length, cancelled, or overflow-trimmed (older turns were dropped to fit the context).
    finish_reason: str
    #: How many old messages were dropped from the context this turn (0 unless finish_reason says so).
    trimmed_messages: int = 0
    #: How many old messages are out of the context in all (this turn's and earlier turns' trimming).
    dropped_messages: int = 0
    #: One line about the cache this turn, for the status bar: restored from disk, or rebuilt ("" if neither).
    cache_note: str = ""
    #: Tokens proposed by speculative decoding this turn, and how many of them the model kept (0 when off).
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    #: Of generated_tokens, those of the thinking block (a reasoning model's); the rest are the answer's.
    thinking_tokens: int = 0
    #: Answered by a remote server: the token counts are its usage (when usage_reported), times are ours.
    remote: bool = False
    usage_reported: bool = True

    @property
    def answer_tokens(self) -> int:
        return self.generated_tokens - self.thinking_tokens

    @property
    def reused_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens

    def as_dict(self) -> dict:
        return asdict(self)


# -- UI to worker ------------------------------------------------------------------------------


@dataclass
class Load:
    """Load a model (freeing the one loaded before). Chats' caches start over on the new model."""

    model: str
    preset: str = "auto"
    #: The context and attention the planner chose for this preset (None: the loader plans them itself).
    context_tokens: int | None = None
    attn_implementation: str | None = None
    #: Bytes of KV cache all open chats may hold together before the least recently used one leaves memory
    #: (None: the planner sizes it from the memory left after loading).
    cache_budget_bytes: int | None = None
    #: Bytes of caches evicted from a GPU that may wait in CPU RAM before going to disk (None: the planner's).
    parked_budget_bytes: int | None = None
    #: Load the preset even where the planner says it won't fit (the user said so); else such a load is refused.
    force: bool = False
    #: A draft model for speculative decoding, loaded beside it where both fit: a model reference, "none", or
    #: None for the one the model's catalog entry names (once downloaded).
    draft: str | None = None


@dataclass
class Generate:
    """Answer the last message of `messages` (a user message) in conversation `conversation_id`.

    The whole conversation is sent every time; the worker's session for that conversation reuses its
    cache up to the first token that differs, so a regenerate or an edit costs only what changed.
    """

    request_id: int
    conversation_id: int
    #: (role, content) pairs, oldest first; the system prompt, if any, first.
    messages: list[tuple[str, str]]
    params: SamplingParams = field(default_factory=SamplingParams)
    #: A reasoning model's thinking on or off, where Loaded.thinking_switch says it can be (None: its default).
    thinking: bool | None = None


@dataclass
class Cancel:
    """Stop the reply of request_id now (the partial reply comes back in Finished, marked cancelled)."""

    request_id: int


@dataclass
class Reset:
    """Forget the cache of one conversation (deleted, or its history rewritten)."""

    conversation_id: int


@dataclass
class Branch:
    """Conversation `conversation_id` was branched from `parent_id`: it starts from a copy of the parent's cache.

    The branch's first Generate crops the copy to the messages the two share, so it prefills only what is new.
    Without a cache for the parent in the worker, nothing happens and that reply reads the whole branch.
    """

    conversation_id: int
    parent_id: int


@dataclass
class Count:
    """How many tokens a message would take, asked before sending one with attachments: the whole chat in
    messages, as a Generate would send it, the new message last."""

    request_id: int
    messages: list[tuple[str, str]]
    max_new_tokens: int


@dataclass
class Shutdown:
    pass


# -- worker to UI ------------------------------------------------------------------------------


@dataclass
class Status:
    """A line about what the worker is doing (loading, converting, downloading)."""

    text: str


@dataclass
class DownloadProgress:
    done_bytes: int
    total_bytes: int
    bytes_per_s: float


@dataclass
class Loaded:
    """A model is ready. notes need the user (a fallback, a slow split, remote code); reasons are the planner's."""

    model: str
    preset: str
    dtype: str
    device: str
    attn_implementation: str
    context_length: int
    footprint_bytes: int
    notes: list[str]
    reasons: list[str] = field(default_factory=list)
    #: The model's own sampling defaults: generation_config.json, with the catalog's over it (sampling.model_defaults).
    sampling: dict = field(default_factory=dict)
    #: The draft model loaded beside it (None: replies draft by prompt lookup, see the notes for why).
    draft: str | None = None
    #: The (open, close) markers of a reasoning model's thinking block (None: it has none), for thinking.Splitter.
    thinking_markers: tuple[str, str] | None = None
    #: The template takes Generate.thinking (Qwen3's enable_thinking); without it the value is ignored.
    thinking_switch: bool = False
    #: For each Generate.thinking value the template takes, whether its prompt opens the block itself, so the
    #: reply starts inside it (thinking.Splitter's starts_inside); a value missing here means False.
    thinking_starts_inside: dict = field(default_factory=dict)


@dataclass
class Counted:
    """The answer to Count. A chat that doesn't fit still sends: its oldest turns are dropped, unless even the
    system prompt and the new message alone leave no room for the reply (too_long), when sending would fail."""

    request_id: int
    #: The new message, attachments included.
    message_tokens: int
    #: The whole chat, rendered by the template.
    prompt_tokens: int
    #: What the reply may use: the context, less max_new_tokens.
    room: int
    context_length: int
    too_long: bool = False

    @property
    def fits(self) -> bool:
        return self.prompt_tokens <= self.room


@dataclass
class Delta:
    request_id: int
    text: str


@dataclass
class Finished:
    """The end of a reply: its full text (the deltas joined, stop strings removed) and its stats."""

    request_id: int
    conversation_id: int
    text: str
    stats: TurnStats


@dataclass
class Evicted:
    """Conversations whose caches left memory to stay under the cache budget."""

    conversation_ids: list[int]
    freed_bytes: int
    #: Their caches were written to disk first, so their next reply reads them back instead.
    to_disk: bool = False
    #: Chats whose caches moved from the GPU to CPU RAM instead (not in conversation_ids).
    parked: list[int] = field(default_factory=list)


@dataclass
class CacheStates:
    """Where each chat's KV cache is for the loaded model: live in GPU memory or RAM, parked in CPU RAM, or in
    a snapshot on disk. A chat in none of them is cold: its next reply reads its whole history."""

    live: list[int]
    parked: list[int]
    disk: list[int]


@dataclass
class Error:
    """One line for the user. request_id is set when a reply failed, None for a failed load."""

    message: str
    request_id: int | None = None


@dataclass
class WorkerDied:
    """Made by the UI side when the worker process is gone without a Shutdown (OOM killer, segfault, kill -9)."""

    exitcode: int | None
    last_log_line: str = ""
