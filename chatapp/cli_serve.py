"""`chatapp serve`: the OpenAI-compatible server (chatapp.server) on a model loaded as `ask` loads one."""

from __future__ import annotations

import argparse
import os
import sys

from .config import Settings
from .errors import ChatappError


def add_parser(sub, add_model_args, whole) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible API server on 127.0.0.1, with KV cache reuse")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (any but loopback needs an API key)")
    serve.add_argument("--port", type=whole(0), default=8000, help="port to listen on (0: a free one)")
    serve.add_argument("--api-key", help="the key clients must send as Bearer (default: $CHATAPP_API_KEY)")
    serve.add_argument("--slots", type=whole(1), help="KV cache slots (default: as many as memory holds, up to 4)")
    serve.add_argument("--max-body-bytes", type=whole(1024), help="largest request body accepted (default 4 MiB)")


def cmd_serve(args: argparse.Namespace, settings: Settings, load) -> int:
    try:
        import fastapi  # noqa: F401  (the serve extra, checked before a model loads for nothing)
        import uvicorn  # noqa: F401

        from .server.app import MAX_BODY_BYTES, bind, is_loopback, run
        from .server.slots import Engine, default_slots, disk_cache
    except ImportError as exc:
        raise ChatappError(
            f"chatapp serve needs the serve extra ({exc.name} is missing): pip install 'chatapp[serve]'"
        ) from None
    api_key = args.api_key or os.environ.get("CHATAPP_API_KEY") or None
    if not is_loopback(args.host) and not api_key:
        print(
            f"chatapp: error: serving on {args.host} lets other machines in: give an API key "
            "(--api-key or CHATAPP_API_KEY), or bind 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    try:
        sock = bind(args.host, args.port)  # before loading: a port in use is said at once
    except OSError as exc:
        raise ChatappError(f"can't listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    with sock:
        loaded = load(args, settings)
        engine = Engine(loaded, args.slots or default_slots(loaded), settings, disk_cache(loaded, settings))
        try:
            run(engine, sock, api_key, args.max_body_bytes or MAX_BODY_BYTES)
        finally:
            engine.close()
    return 0
