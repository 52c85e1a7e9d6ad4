"""The `chatapp` command: builds Settings, resolves the model, and wires the engine to a terminal."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import attachments, planner, sampling
from .cli_hub import cmd_models, cmd_pull, cmd_rm, cmd_search
from .errors import ChatappError
from .logs import route_library_logs

if TYPE_CHECKING:
    from .config import Settings
    from .sampling import SamplingParams


def _quiet_libraries() -> None:
    # Library progress bars and advice would bury our one-line messages: no bars, and advice goes to the log.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from .logs import adopt_transformers_logging

    hf_logging.disable_progress_bar()
    adopt_transformers_logging()


def _note(text: str) -> None:
    print(f"chatapp: {text}", file=sys.stderr, flush=True)


def _as_text(text: str, where: str) -> str:
    """`text` with every byte that was not UTF-8 as U+FFFD, said once in one line.

    Python keeps such bytes from argv (and from stdin, see main) as lone surrogates, which no tokenizer accepts.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        _note(f"{where} is not valid UTF-8: the bytes that are not are read as \ufffd")
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _whole(least: int, hint: str = ""):
    """An argparse type: a whole number of at least `least`; a nonsense count is refused before anything runs."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more{hint}, got {value}")
        return value

    return parse


def _sampling_value(name: str):
    """An argparse type: a value of sampling parameter `name`, checked against its bounds before anything runs."""

    def parse(text: str):
        try:
            return sampling.parse(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name} ")) from None

    return parse


FORCE_HELP = "load the preset even where the planner says it won't fit"
FORCE_SEND_HELP = (
    FORCE_HELP + "; and send a message that, with the conversation before it, won't fit the context with room for"
    " the reply (refused otherwise): the oldest turns are then dropped until it fits, and a message too long even"
    " alone is still refused"
)


def _add_model_args(parser: argparse.ArgumentParser, force_help: str = FORCE_HELP) -> None:
    parser.add_argument("--model", "-m", help="catalog key, Hub repo id (Org/Name[@rev]), folder or .gguf file")
    parser.add_argument("--preset", "-p", choices=planner.PRESETS, help="precision/quantization (default: auto)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickle .bin weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own Python code")
    parser.add_argument("--force", action="store_true", help=force_help)


def _add_draft_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--draft",
        metavar="MODEL|none",
        help="a smaller model with the same tokenizer that drafts tokens (speculative decoding); "
        "default: the one the catalog names for the model, once downloaded",
    )


def _add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        metavar="URL|local",
        help="an OpenAI-compatible server to use instead of the local worker (…/v1); local: the worker, whatever "
        "backend_url says",
    )
    parser.add_argument("--api-key", help="the server's API key (default: $CHATAPP_API_KEY, else the keyring)")


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    _add_draft_arg(parser)
    _add_backend_args(parser)
    parser.add_argument("--system", "-s", help="system prompt")
    parser.add_argument(
        "--persona", help="a persona's name (its file name without .toml): its system prompt and sampling"
    )
    for name, limit in sampling.LIMITS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=_sampling_value(name), help=limit.help)
    parser.add_argument("--stats", action="store_true", help="print turn statistics after each reply")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, as all of ours are: its usage block would bury the reason."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} -h` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chatapp", description="Chat with local Hugging Face models.")
    sub = parser.add_subparsers(dest="command")

    ask = sub.add_parser("ask", help="one reply, streamed to stdout")
    ask.add_argument("prompt", nargs="?", help="the question; '-' or omitted reads stdin")
    ask.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="FILE",
        help=f"a text file to put in the message before the question (repeatable; UTF-8, at most "
        f"{attachments.MAX_BYTES:,} bytes)",
    )
    _add_model_args(ask, FORCE_SEND_HELP)
    _add_generation_args(ask)

    tui = sub.add_parser("tui", help="the chat app (the default when no command is given)")
    tui.add_argument("--model", "-m", help="catalog key, Hub repo id (Org/Name[@rev]), folder or .gguf file")
    tui.add_argument("--preset", "-p", choices=planner.PRESETS, help="precision/quantization")
    _add_backend_args(tui)

    repl = sub.add_parser("repl", help="a plain line-based multi-turn chat (/read PATH, /reset, /regen, /exit)")
    _add_model_args(repl, FORCE_SEND_HELP)
    _add_generation_args(repl)

    bench = sub.add_parser("bench", help="cached session vs naive re-encode vs raw generate")
    _add_model_args(bench)
    bench.add_argument("--turns", type=_whole(1), default=8)
    bench.add_argument("--max-new-tokens", type=_whole(1), default=24)
    bench.add_argument("--user-tokens", type=_whole(1), default=64, help="tokens per scripted user message")
    bench.add_argument(
        "--doc-tokens",
        type=_whole(0),
        default=None,
        help="tokens of the document in the first message (default: 75%% of the context, at most 6144; 0: none)",
    )
    bench.add_argument(
        "--speculative",
        metavar="ngram|off|MODEL",
        default="ngram",
        help="drafts in the cached chat: prompt lookup (default), none, or a draft model; "
        "all but off also run the chat without drafts, to compare",
    )
    bench.add_argument(
        "--scenario",
        choices=("chat", "quote"),
        default="chat",
        help="chat: a document, then --user-tokens messages; quote: a document, then asks to quote it",
    )
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")
    bench.add_argument(
        "--restart", action="store_true", help="also: the next message after a quit, from a snapshot and cold"
    )

    plan = sub.add_parser("plan", help="what each preset needs on this machine, and which fits")
    plan.add_argument("model", help="catalog key, Hub repo id, folder or .gguf file")
    plan.add_argument(
        "--context",
        type=_whole(1, " (leave it out for the model's own)"),
        help="context length in tokens (default: the model's, lowered to fit)",
    )
    plan.add_argument("--preset", choices=planner.PRESETS, default="auto")
    plan.add_argument("--gpu", action="append", metavar="SPEC", help="'24GiB', 'RTX 3060:12GiB' or 'T4:16GiB:7.5'")
    plan.add_argument("--no-gpu", action="store_true", help="plan for this machine without its GPUs")
    plan.add_argument("--ram", metavar="SIZE", help="CPU RAM to plan for, e.g. 32GiB")
    plan.add_argument("--json", action="store_true")
    _add_draft_arg(plan)

    sub.add_parser("doctor", help="what is installed and usable, and how to fix what isn't")

    pull = sub.add_parser("pull", help="download a model into the Hugging Face cache (resumes; Ctrl+C stops)")
    pull.add_argument("model", help="catalog key or Hub repo id (Org/Name[@revision])")
    pull.add_argument("--allow-pickle", action="store_true")
    pull.add_argument("--trust-remote-code", action="store_true")
    pull.add_argument("--force", action="store_true", help="download even when no preset fits this machine")

    rm = sub.add_parser("rm", help="delete a downloaded model from the Hugging Face cache")
    rm.add_argument("model", help="catalog key or Hub repo id")

    models = sub.add_parser("models", help="the catalog and the downloaded models")
    models.add_argument("--local", action="store_true", help="only downloaded models")
    models.add_argument("--json", action="store_true")

    search = sub.add_parser("search", help="search the Hub for text-generation models")
    search.add_argument("text")
    search.add_argument("--limit", type=_whole(1), default=20)
    search.add_argument("--json", action="store_true")

    from .cli_remote import add_parser as add_key_parser
    from .cli_serve import add_parser as add_serve_parser

    add_serve_parser(sub, _add_model_args, _whole)
    add_key_parser(sub)

    cache = sub.add_parser("cache", help="the chats' KV cache snapshots on disk: list them, or clear them")
    cache.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    cache.add_argument("--chat", type=_whole(1), help="clear: only this chat's snapshots (its number in the list)")
    cache.add_argument("--model", help="clear: only this model's snapshots")
    cache.add_argument("--all", action="store_true", help="clear: every snapshot")
    cache.add_argument("--json", action="store_true", help="list: one JSON object")

    config = sub.add_parser("config", help="print the config file path or its values")
    config.add_argument("action", choices=("path", "show"), help="path: where config.toml is; show: every setting")
    return parser


def _load(args: argparse.Namespace, settings: Settings, draft: str | None = None):
    from .engine import load_model

    model = settings.default_model if args.model is None else args.model  # `--model ''` is an error, not the default
    preset = args.preset or settings.default_preset
    from .progress import ProgressBar

    _note(f"loading {model} ({preset})...")
    bar = ProgressBar(f"chatapp: downloading {model}")
    try:
        loaded = load_model(
            model,
            preset,
            settings=settings,
            device=args.device,
            allow_pickle=args.allow_pickle,
            trust_remote_code=True if args.trust_remote_code else None,
            force=args.force,
            on_status=_note,
            on_progress=bar.update,
            draft=draft or getattr(args, "draft", None),
        )
    finally:
        bar.close()
    for note in loaded.notes:
        _note(note)
    _note(loaded.describe())
    return loaded


def _sampling(args: argparse.Namespace, settings: Settings, loaded, persona=None) -> SamplingParams:
    """The flags, else the persona's, else the model's own defaults (generation_config.json, the catalog's over
    it), else config.toml."""
    flags = {name: getattr(args, name) for name in sampling.LIMITS}
    try:
        return sampling.resolve(flags, persona.sampling if persona else {}, loaded.sampling_defaults(), settings)
    except ValueError as exc:
        raise ChatappError(str(exc)) from None


@contextmanager
def _ctrl_c_cancels():
    """While a reply streams, Ctrl+C stops it (keeping what was said) instead of killing the program."""
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def _reply(session, messages, params, show_stats: bool):
    """Stream the reply to `messages` to stdout; its stats."""
    stats = None
    with _ctrl_c_cancels() as cancel:
        for response in session.reply_to(messages, params, cancel):
            sys.stdout.write(response.text)
            sys.stdout.flush()
            stats = response.stats or stats
    sys.stdout.write("\n")
    if stats and stats.finish_reason == "cancelled":
        _note("stopped; the partial reply is kept")
    if stats and stats.trimmed_messages:
        _note(f"the conversation outgrew the context: the oldest {stats.trimmed_messages} messages were dropped")
    if show_stats and stats:
        _note(format_stats(stats))
    return stats


def format_stats(stats) -> str:
    return (
        f"prompt {stats.prompt_tokens} tok, prefilled {stats.prefilled_tokens}, "
        f"generated {stats.generated_tokens}, ttft {stats.ttft_s:.2f}s, "
        f"{stats.decode_tokens_per_s:.1f} tok/s, cache {stats.cache_tokens}, {stats.finish_reason}"
        + (f", drafted {stats.drafted_tokens}, accepted {stats.accepted_tokens}" if stats.drafted_tokens else "")
    )


def _persona(args: argparse.Namespace, settings: Settings):
    """The persona --persona names (None without the flag); an unknown or broken one is a one-line error."""
    if not args.persona:
        return None
    from .personas import load_personas

    personas, errors = load_personas(settings.config_dir)
    if args.persona in personas:
        return personas[args.persona]
    broken = [line for line in errors if f"/{args.persona}.toml:" in line]
    if broken:
        raise ChatappError(broken[0].removesuffix("; skipped"))
    raise ChatappError(f"unknown persona '{args.persona}' (known: {', '.join(personas) or 'none'})")


def _opening(args, persona=None) -> list:
    from .protocol import Message

    system = _as_text(args.system, "the system prompt") if args.system else (persona.system_prompt if persona else "")
    return [Message("system", system)] if system else []


def _read_attachments(paths: list[str]) -> list[attachments.Attachment]:
    """Every file --attach names, all read before anything loads: a bad one is one line and nothing is sent."""
    found = [attachments.read_attachment(path, Path.cwd()) for path in paths]
    for attachment in found:
        _note(f"attached {attachment.name} ({len(attachment.content):,} chars)")
    return found


def _too_long(session, messages, room: int, attached: bool, force_with: str) -> str:
    """Why `messages` must not be sent (they can't fit the context with `room` tokens for the reply), or "".

    The conversation is counted as the session would send it today, without dropping any more turns: the turns
    the session dropped already stay dropped. With attachments, a message that fits has its count said too.
    """
    if getattr(session, "remote", None) is not None:
        return ""  # the server counts with its own tokenizer, and refuses what doesn't fit in one line
    from .engine.session import render_ids

    tokenizer, context = session.loaded.tokenizer, session.context_length
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    tokens = len(render_ids(tokenizer, system + rest[min(session.dropped_messages, len(rest) - 1) :]))
    if tokens + room <= context:
        if attached:
            _note(
                f"the message comes to {tokens:,} tokens of the {context:,}-token context ({room:,} kept for the reply)"
            )
        return ""
    alone = len(render_ids(tokenizer, system + rest[-1:]))
    if alone + room > context:
        return (
            f"not sent: the message is {alone:,} tokens, and with {room:,} for the reply that is more than the "
            f"{context:,}-token context (attach less, or lower --max-new-tokens)"
        )
    return (
        f"not sent: with the conversation before it the message comes to {tokens:,} tokens, and with {room:,} for "
        f"the reply that is more than the {context:,}-token context; {force_with} sends it anyway, dropping the "
        "oldest turns"
    )


def _session(args: argparse.Namespace, settings: Settings):
    """A ChatSession on the model loaded here, or a RemoteSession on the server --backend (or backend_url) names."""
    url = _backend_url(args, settings)
    if url:
        from .cli_remote import remote_session

        return remote_session(url, args, settings, _note)
    from .engine import ChatSession

    return ChatSession(_load(args, settings))


def _backend_url(args: argparse.Namespace, settings: Settings) -> str:
    """The server --backend names ("local": none, over backend_url), else backend_url ("": the local worker)."""
    if args.backend == "local":
        return ""
    return args.backend or settings.backend_url


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from .protocol import Message

    prompt = args.prompt
    if prompt in (None, "-"):
        if prompt is None and sys.stdin.isatty():
            raise ChatappError("no prompt: pass one as an argument or on stdin")
        prompt = sys.stdin.read().strip()
    prompt = _as_text(prompt, "the prompt")
    if not prompt:
        raise ChatappError("the prompt is empty")
    attached = _read_attachments(args.attach)
    persona = _persona(args, settings)
    session = _session(args, settings)
    params = _sampling(args, settings, session.loaded, persona)
    messages = [*_opening(args, persona), Message("user", attachments.message_text(prompt, attached))]
    why = _too_long(session, messages, params.max_new_tokens, bool(attached), "--force")
    if why and not args.force:
        raise ChatappError(why)
    _reply(session, messages, params, args.stats)
    return 0


def _read_command(text: str) -> str | None:
    """The path of a `/read PATH` line ("" when it has none); None for any other line."""
    name, _, rest = text.partition(" ")
    return rest.strip() if name == "/read" else None


def cmd_repl(args: argparse.Namespace, settings: Settings) -> int:
    from .protocol import Message

    persona = _persona(args, settings)
    session = _session(args, settings)
    params = _sampling(args, settings, session.loaded, persona)
    history = _opening(args, persona)
    waiting: list[attachments.Attachment] = []  # /read files for the next message
    refused = None  # the messages last refused as too long, and how many waiting files they hold: /force sends them
    _note("type a message; /read PATH attaches a file to it, /regen answers again, /reset starts over, /exit quits")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = _as_text(line.strip(), "that line")
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history, waiting, refused = _opening(args, persona), [], None
            _note("conversation reset")
            continue
        path = _read_command(text)
        if path is not None:
            try:
                attachment = attachments.read_attachment(path, Path.cwd())
            except ChatappError as exc:
                _note(f"error: {exc}")
                continue
            waiting.append(attachment)
            _note(f"attached {attachment.name} ({len(attachment.content):,} chars) to the next message")
            continue
        used = 0  # how many waiting files this turn sends
        if text == "/regen":
            messages = history[:-1] if history and history[-1].role == "assistant" else history
            if not messages or messages[-1].role != "user":
                _note("error: there is no message to answer yet")
                continue
        elif text == "/force":
            if refused is None:
                _note("error: no message was refused; /force sends one that was too long for the context")
                continue
            messages, used = refused
        else:
            messages, used = [*history, Message("user", attachments.message_text(text, waiting))], len(waiting)
            why = _too_long(session, messages, params.max_new_tokens, bool(waiting), "/force")
            if why and not args.force:
                _note(f"error: {why}")  # the files stay waiting, and /force can still send it
                refused = messages, used
                continue
        try:
            _reply(session, messages, params, args.stats)
        except ChatappError as exc:
            _note(f"error: {exc}")  # history is untouched: nothing typed before is lost
            continue
        history, waiting, refused = list(session.messages), waiting[used:], None


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from .engine.bench import format_table, run_bench

    spec = args.speculative
    loaded = _load(args, settings, draft="none" if spec in ("ngram", "off") else spec)
    if spec not in ("ngram", "off") and loaded.draft is None:
        raise ChatappError(next((n for n in loaded.notes if n.startswith(("no draft", "draft "))), f"no draft: {spec}"))
    result = run_bench(
        loaded,
        turns=args.turns,
        max_new_tokens=args.max_new_tokens,
        user_tokens=args.user_tokens,
        doc_tokens=args.doc_tokens,
        progress=_note,
        restart=args.restart,
        speculative=args.speculative,
        scenario=args.scenario,
    )
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from . import hardware
    from .catalog import load_catalog
    from .facts import facts_for
    from .refs import parse_ref
    from .report import format_plan

    try:
        hw = hardware.describe_by_hand(hardware.detect(), args.gpu, args.no_gpu, args.ram)
    except ValueError as exc:
        raise ChatappError(str(exc)) from None
    catalog = load_catalog(settings.config_dir / "models.toml")
    source = parse_ref(args.model, catalog)
    facts = facts_for(source)
    draft = args.draft or (source.spec.draft if source.spec else None)
    draft_facts = facts_for(parse_ref(draft, catalog)) if draft and draft != "none" else None
    result = planner.choose(
        hw, facts, args.context, args.preset, flash_attn_installed=hardware.flash_attn_installed(), draft=draft_facts
    )
    print(json.dumps(planner.plan_dict(result)) if args.json else format_plan(result))
    return 0


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from .doctor import doctor
    from .hardware import detect

    info, problems = doctor(settings, detect())
    for line in info:
        print(line)
    for line in problems:
        print(f"problem: {line}")
    if not problems:
        print("no problems found")
    return 1 if problems else 0


COMMANDS = {
    "ask": cmd_ask,
    "repl": cmd_repl,
    "bench": cmd_bench,
    "plan": cmd_plan,
    "doctor": cmd_doctor,
    "pull": cmd_pull,
    "rm": cmd_rm,
    "models": cmd_models,
    "search": cmd_search,
    "serve": lambda args, settings: _serve(args, settings),
    "key": lambda args, settings: _key(args, settings),
}


def _key(args: argparse.Namespace, settings: Settings) -> int:
    from .cli_remote import cmd_key

    return cmd_key(args, settings)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from .cli_serve import cmd_serve

    return cmd_serve(args, settings, _load)


def _use_hub_cache(settings: Settings) -> None:
    # huggingface_hub reads its cache path once, at import; the worker process inherits the variable.
    if settings.hub_cache:
        os.environ["HF_HUB_CACHE"] = str(settings.hub_cache)


def _settings() -> Settings:
    """The settings, strictly: a bad value or an unusable folder is one line and exit 1."""
    from .config import check_folders, load_settings_sourced

    settings, _errors, sources = load_settings_sourced(strict=True)
    check_folders(settings, sources)
    return settings


def _tui(args) -> int:
    """The Textual app. A bad config value is shown in the app, which falls back to that value's default."""
    from .config import check_folders, load_settings_sourced

    settings, errors, sources = load_settings_sourced()
    check_folders(settings, sources)
    _use_hub_cache(settings)
    route_library_logs(settings.data_dir)  # a library's stray line on stderr would tear the screen
    if args.backend:
        from dataclasses import replace

        from .cli_remote import check_url

        url = _backend_url(args, settings)
        settings = replace(settings, backend_url=check_url(url) if url else "")
    if args.api_key:
        os.environ["CHATAPP_API_KEY"] = args.api_key  # this process only: never written anywhere
    from .ui.app import run

    return run(settings, errors, args.model, args.preset)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["tui", *argv]  # plain `chatapp` is the app
    args = build_parser().parse_args(argv)
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 reach _as_text, not a traceback
    try:
        if args.command == "config":
            from .cli_config import cmd_config

            return cmd_config(args)  # loads the settings itself, leniently, so it can report bad values
        if args.command == "tui":
            return _tui(args)
        settings = _settings()
        if args.command == "cache":
            from .cli_cache import cmd_cache

            return cmd_cache(args, settings)
        _use_hub_cache(settings)
        route_library_logs(settings.data_dir)
        if args.command in ("ask", "repl", "bench", "serve"):
            _quiet_libraries()
        return COMMANDS[args.command](args, settings)
    except ChatappError as exc:
        print(f"chatapp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_left()


def _reader_left() -> int:
    """The reader of stdout went away (`chatapp plan ... | head`): stop quietly, as Unix tools do.

    Python's own flush at exit would fail on the same pipe, so stdout is pointed at /dev/null first.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a tool its reader left


if __name__ == "__main__":
    sys.exit(main())
