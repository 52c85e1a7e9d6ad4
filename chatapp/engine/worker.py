"""The backend worker: the engine in a child process, speaking chatapp.protocol over a multiprocessing pipe.

The UI starts `main` with the "spawn" start method. Importing this module imports nothing heavy, so the UI
can name it as the child's entry point without importing torch; the child imports the engine itself.
One thread reads requests so that a Cancel acts while the main thread is busy generating.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from multiprocessing.connection import Connection

from .. import protocol as p
from ..config import Settings


def main(conn: Connection, settings: Settings, log_path: str | None = None) -> None:
    """The child process: serve requests from `conn` until Shutdown or until the UI goes away."""
    if log_path:
        # Library warnings written to the terminal would tear the UI's screen apart; they go to a log instead.
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # one made by an older version was world-readable
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    set_environment(os.environ)
    Worker(conn, settings).serve()


def set_environment(environ) -> None:
    """The worker's defaults, before torch starts CUDA; a variable the user set stays as it is."""
    environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # download progress comes as events instead
    # On an H200, an 8B int8 turn left torch's cache holding 16 GB for 9 GB of tensors (bitsandbytes' prefill
    # fragments it); with expandable segments it held 9.6 GB, CUDA graphs still worked, and the compiled decode
    # ran as fast (bench/GPU.md). PYTORCH_ALLOC_CONF is the newer name of the same setting.
    if "PYTORCH_CUDA_ALLOC_CONF" not in environ and "PYTORCH_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


class Worker:
    """Serves one UI: loads the model it asks for, answers Generate requests, one ChatSession per chat.

    Requests run one at a time, in order, on the main thread. A reader thread takes them off the pipe and
    sets the cancel event of the request a Cancel names, so a cancel acts mid-reply, and one that arrives
    before its request has even started is not lost.
    """

    def __init__(self, conn: Connection, settings: Settings):
        self.conn = conn
        self.settings = settings
        self.loaded = None
        self.disk = None  # the DiskCache of the loaded model (None: snapshots are off)
        self.budget: int | None = None  # bytes of KV cache live sessions may hold together
        self.park_budget = 0  # bytes of KV cache parked in CPU RAM (with a GPU)
        self.sessions: OrderedDict[int, object] = OrderedDict()  # conversation id -> ChatSession, LRU first
        self.parked: OrderedDict[int, object] = OrderedDict()  # evicted from the GPU, kept in CPU RAM
        self.requests: queue.Queue = queue.Queue()
        self._cancels: dict[int, threading.Event] = {}  # request id -> its cancel, until the request ends
        self._finished = 0  # the highest request id that has ended
        self._closing = False
        self._lock = threading.Lock()

    def send(self, event) -> None:
        self.conn.send(event)

    def serve(self) -> None:
        threading.Thread(target=self._read, daemon=True, name="worker-reader").start()
        while True:
            request = self.requests.get()
            if isinstance(request, p.Shutdown):
                self._save_all()  # quitting or restarting: every chat's cache leaves memory
                return
            try:
                self.handle(request)
            except (BrokenPipeError, ConnectionError, EOFError):
                return  # the UI is gone

    def _read(self) -> None:
        while True:
            try:
                request = self.conn.recv()
            except (EOFError, OSError):
                request = p.Shutdown()
            if isinstance(request, p.Cancel):
                self._cancel(request.request_id)
                continue
            if isinstance(request, p.Shutdown):
                # A shutdown also stops the reply in progress, so quitting never waits for a long reply.
                with self._lock:
                    self._closing = True
                    for event in self._cancels.values():
                        event.set()
                self.requests.put(request)
                return
            self.requests.put(request)

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id > self._finished:  # a cancel for a reply that ended already is moot
                self._cancels.setdefault(request_id, threading.Event()).set()

    def _cancel_event(self, request_id: int) -> threading.Event:
        with self._lock:
            event = self._cancels.setdefault(request_id, threading.Event())
            if self._closing:
                event.set()
            return event

    def handle(self, request) -> None:
        if self._closing:
            return
        if isinstance(request, p.Load):
            self.load(request)
        elif isinstance(request, p.Generate):
            self.generate(request)
        elif isinstance(request, p.Branch):
            self.branch(request)
        elif isinstance(request, p.Count):
            self.count(request)
        elif isinstance(request, p.Reset):
            self.sessions.pop(request.conversation_id, None)
            self.parked.pop(request.conversation_id, None)
            if self.disk is not None:
                self.disk.forget(request.conversation_id)
            self.send_cache_states()

    def _error(self, request, exc: BaseException) -> None:
        from ..errors import ChatappError, first_line

        text = first_line(exc)
        if not isinstance(exc, ChatappError):
            text = f"{type(exc).__name__}: {text}"
        self.send(p.Error(text, getattr(request, "request_id", None)))

    # -- requests --------------------------------------------------------------------------

    def unload(self) -> None:
        """Free the model and every chat's cache: the first half of a switch. Caches are saved first, to come back
        on a switch back; then the device gets the memory back, so the next model has all of it."""
        import gc

        self._save_all()
        self.sessions.clear()
        self.parked.clear()
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        self.loaded = None
        gc.collect()
        _empty_device_cache()

    def load(self, request: p.Load) -> None:
        from .loader import load_model

        self.unload()
        loaded = None
        try:
            loaded = load_model(
                self._source(request.model),
                request.preset,
                settings=self.settings,
                context=request.context_tokens,
                attn_implementation=request.attn_implementation,
                force=request.force,
                draft=request.draft,
                on_status=lambda text: self.send(p.Status(text)),
                on_progress=lambda pr: self.send(p.DownloadProgress(pr.done_bytes, pr.total_bytes, pr.bytes_per_s)),
            )
        except Exception as exc:  # every load failure becomes one line for the user; the worker stays up
            self._error(request, exc)
        if loaded is None:
            # A load that failed part way (CUDA out of memory) left its tensors to the garbage collector and their
            # blocks in torch's cache; with the exception gone, free them, or the model the app loads next (the
            # previous one) may not fit beside them.
            self.unload()
            return
        self.loaded = loaded
        live, parked = _cache_budgets(loaded)
        self.budget = request.cache_budget_bytes or live
        self.park_budget = parked if request.parked_budget_bytes is None else request.parked_budget_bytes
        self.disk = self._disk_cache(loaded)
        print(loaded.describe(), *(f"  {reason}" for reason in loaded.reasons), sep="\n", flush=True)
        self.send(
            p.Loaded(
                model=loaded.source.label,
                preset=loaded.preset,
                dtype=loaded.dtype,
                device=loaded.device,
                attn_implementation=loaded.attn_implementation,
                context_length=loaded.context_length,
                footprint_bytes=loaded.footprint_bytes,
                notes=list(loaded.notes),
                reasons=list(loaded.reasons),
                sampling=loaded.sampling_defaults(),
                draft=loaded.draft.source.label if loaded.draft else None,
                **_thinking_facts(loaded.tokenizer),
            )
        )
        self.send_cache_states()

    def generate(self, request: p.Generate) -> None:
        from .session import ChatSession, Message

        rid = request.request_id
        cancel = self._cancel_event(rid)
        try:
            if self.loaded is None:
                self.send(p.Error("no model is loaded yet", rid))
                return
            cid = request.conversation_id
            messages = [Message(role, content) for role, content in request.messages]
            session = self.sessions.get(cid) or self._unpark(cid)
            if session is None:
                session = self.sessions[cid] = ChatSession(self.loaded)
                if self.disk is not None:
                    self.disk.restore(cid, session, messages, request.params.max_new_tokens)
            self.sessions.move_to_end(cid)
            for response in session.reply_to(messages, request.params, cancel, request.thinking):
                if response.text:
                    self.send(p.Delta(rid, response.text))
                if response.stats is not None:
                    reply = session.messages[-1].content
                    self.send(p.Finished(rid, cid, reply, response.stats))
                    if self.disk is not None:
                        self.disk.note_turn(response.stats.prefilled_tokens, response.stats.ttft_s)
                        self.disk.save(cid, session)  # in the background, while the user reads
        except (BrokenPipeError, ConnectionError):
            raise
        except Exception as exc:
            self._error(request, exc)
        finally:
            with self._lock:
                self._cancels.pop(rid, None)
                self._finished = max(self._finished, rid)
        self._evict(keep=request.conversation_id)
        _trim_device_cache()
        self.send_cache_states()

    def count(self, request: p.Count) -> None:
        from ..errors import ContextOverflow
        from .session import Message, _fit, render_ids

        if self.loaded is None:
            self.send(p.Error("no model is loaded yet", request.request_id))
            return
        tokenizer, context = self.loaded.tokenizer, self.loaded.context_length
        messages = [Message(role, content) for role, content in request.messages]
        try:
            alone = len(tokenizer(messages[-1].content, add_special_tokens=False)["input_ids"])
            prompt = len(render_ids(tokenizer, messages))
            try:
                _fit(tokenizer, messages, 0, request.max_new_tokens, context)
                too_long = False
            except ContextOverflow:
                too_long = True
        except Exception as exc:
            self._error(request, exc)
            return
        room = context - request.max_new_tokens
        self.send(p.Counted(request.request_id, alone, prompt, room, context, too_long))

    def branch(self, request: p.Branch) -> None:
        from .session import ChatSession

        if self.loaded is None:
            return
        parent = self.sessions.get(request.parent_id) or self.parked.get(request.parent_id)
        try:
            if parent is not None:
                twin = parent.copy()
                twin.move_to(self.loaded.model.device)
            elif self.disk is not None:
                # The parent's cache left memory: its snapshot becomes the branch's cache (the parent's file stays).
                twin = ChatSession(self.loaded)
                if not self.disk.restore(request.parent_id, twin, None):
                    return
            else:
                return
        except Exception as exc:  # out of memory, say: the branch's first reply then reads it all, as without a copy
            print(f"branch {request.conversation_id}: no copy of chat {request.parent_id}'s cache: {exc}", flush=True)
            return
        self.sessions[request.conversation_id] = twin
        self.sessions.move_to_end(request.conversation_id)
        # The branch is where the user goes next: it is the last chat to evict, and the copy counts in the budget.
        self._evict(keep=request.conversation_id)

    def _evict(self, keep: int) -> None:
        """Move the least recently used chats' caches out of memory while the live ones are over the budget:
        to CPU RAM while the parked budget allows (with a GPU), else to disk."""
        total = sum(s.cache_bytes() for s in self.sessions.values())
        parked, gone, freed = [], [], 0
        for cid in list(self.sessions):
            if self.budget is None or total <= self.budget:
                break
            if cid == keep:
                continue
            session = self.sessions.pop(cid)
            size = session.cache_bytes()
            total -= size
            freed += size
            if self.park_budget > 0:
                session.move_to("cpu")
                self.parked[cid] = session
                parked.append(cid)
            else:
                self._to_disk(cid, session)
                gone.append(cid)
        held = sum(s.cache_bytes() for s in self.parked.values())
        for cid in list(self.parked):
            if held <= self.park_budget:
                break
            session = self.parked.pop(cid)
            held -= session.cache_bytes()
            self._to_disk(cid, session)
            gone.append(cid)
        if parked or gone:
            self.send(p.Evicted(gone, freed, to_disk=self.disk is not None, parked=parked))

    def _unpark(self, cid: int):
        session = self.parked.pop(cid, None)
        if session is not None:
            session.move_to(self.loaded.model.device)
            self.sessions[cid] = session
        return session

    def _to_disk(self, cid: int, session) -> None:
        if self.disk is not None:
            self.disk.save(cid, session, wait=True)

    def _source(self, ref: str):
        """What the reference names, with the shipped catalog alone when the user's models.toml is broken (the
        UI says so); the app stays usable."""
        from ..catalog import load_catalog_or_shipped
        from ..refs import parse_ref

        catalog, problem = load_catalog_or_shipped(self.settings.config_dir / "models.toml")
        if problem:
            print(problem, flush=True)
        return parse_ref(ref, catalog)

    def send_cache_states(self) -> None:
        on_disk = self.disk.chats_on_disk() if self.disk is not None else []
        self.send(p.CacheStates(list(self.sessions), list(self.parked), on_disk))

    def _disk_cache(self, loaded):
        from ..snapshots import kv_dir
        from .disk_cache import DiskCache

        if self.settings.kv_disk_budget <= 0:
            return None
        try:
            return DiskCache(kv_dir(self.settings.data_dir), loaded, self.settings.kv_disk_budget)
        except OSError as exc:
            print(f"kv snapshots are off: {exc}", flush=True)
            return None

    def _save_all(self) -> None:
        if self.disk is None:
            return
        for cid, session in [*self.sessions.items(), *self.parked.items()]:
            self.disk.save(cid, session)
        self.disk.flush()


def _cache_budgets(loaded) -> tuple[int | None, int]:
    """(live, parked) KV bytes for all chats, sized by the planner from the memory left after loading; its KV
    formula gives the bytes of one cache filled to the whole context."""
    live, parked, _ = cache_budgets(loaded)
    return live, parked


def cache_budgets(loaded) -> tuple[int | None, int, int | None]:
    """(live, parked, one) KV bytes: for all chats live, parked, and for one cache filled to the whole context
    (None, 0, None when the planner can't read the model)."""
    from ..errors import ChatappError
    from ..facts import facts_from_config
    from ..hardware import detect_cpu
    from ..planner import activation_bytes, cache_budgets, kv_cache_bytes, usable_bytes

    try:
        facts = facts_from_config(loaded.source.label, loaded.model.config.to_dict(), params=0)
    except ChatappError as exc:  # a forced load of a model the planner can't read: no budget, no eviction
        print(f"no KV cache budget: {exc}", flush=True)
        return None, 0, None
    per_context = kv_cache_bytes(facts, loaded.context_length, loaded.dtype)
    if loaded.draft is not None:  # each chat's cache has a draft twin (session.cache_bytes counts both)
        try:
            draft = facts_from_config(loaded.draft.source.label, loaded.draft.model.config.to_dict(), params=0)
            per_context += kv_cache_bytes(draft, loaded.draft.context_length, loaded.draft.dtype)
        except ChatappError:
            pass
    device_type = loaded.device.split(":")[0]
    ram = detect_cpu().ram_available_bytes
    free = ram
    if device_type == "cuda":
        import torch

        free = torch.cuda.mem_get_info(loaded.model.device)[0]
    dtype = loaded.dtype if loaded.dtype in ("fp32", "bf16", "fp16") else "bf16"
    room = usable_bytes(free) - per_context - activation_bytes(facts, loaded.context_length, dtype, device_type)
    return (*cache_budgets(per_context, room, ram, on_gpu=device_type == "cuda"), per_context)


def _thinking_facts(tokenizer) -> dict:
    """Loaded's thinking fields: the markers, the switch, and which thinking values' prompts open the block."""
    from .reasoning import marker_pair, starts_inside, switch

    pair, has_switch, inside = marker_pair(tokenizer), switch(tokenizer), {}
    values = (None, True, False) if has_switch else (None,)
    if pair is not None:
        try:
            inside = {value: starts_inside(tokenizer, value) for value in values}
        except Exception as exc:  # such a template fails each reply too, and says why there; the load goes on
            print(f"no thinking probe: the template can't render one message: {exc}", flush=True)
    return {"thinking_markers": pair, "thinking_switch": has_switch, "thinking_starts_inside": inside}


#: After a turn, torch's cache may hold far more than the tensors in use: an 8B's int8 prefill (bitsandbytes)
#: left 7 GB of it unused on an H200 (bench/GPU.md), which other processes and the next plan then can't have.
TRIM_ABOVE_BYTES = 1024**3


def _trim_device_cache() -> None:
    """Give torch's unused cached blocks back to the driver when they pass TRIM_ABOVE_BYTES, and the C heap's free
    pages back to the kernel (heap.py)."""
    import torch

    from . import heap

    heap.trim()
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    if torch.cuda.memory_reserved() - torch.cuda.memory_allocated() > TRIM_ABOVE_BYTES:
        torch.cuda.empty_cache()


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
