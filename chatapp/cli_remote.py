"""The CLI's side of remote backends: `ask`/`repl --backend URL`, and `chatapp key set|delete URL`."""

from __future__ import annotations

import argparse
import getpass

from .config import Settings
from .errors import ChatappError, RemoteError


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ChatappError(f"the backend must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def remote_session(url: str, args: argparse.Namespace, settings: Settings, note):
    """A RemoteSession on the model the server serves: --model if given (it must be there), else the default
    model when the server has it, else the server's first."""
    from .remote import Remote, RemoteSession, api_key, choose_model, host

    url = check_url(url)
    remote = Remote(url, api_key(url, getattr(args, "api_key", None)))
    model, context, why = choose_model(remote.models(), args.model, settings.default_model)
    if why:
        note(why)
    note(f"remote: {host(url)}, model {model}")
    return RemoteSession(remote, model, context)


def add_parser(sub) -> None:
    key = sub.add_parser("key", help="store or delete a remote server's API key in the system keyring")
    key.add_argument("action", choices=("set", "delete"))
    key.add_argument("url", help="the server's base URL, as given to --backend")


def cmd_key(args: argparse.Namespace, settings: Settings) -> int:
    from .remote import store_key

    url = check_url(args.url)
    if args.action == "delete":
        store_key(url, None)
        print(f"deleted the key for {url}")
        return 0
    key = getpass.getpass(f"API key for {url}: ").strip()
    if not key:
        raise RemoteError("no key given; nothing stored")
    store_key(url, key)
    print(f"stored the key for {url} in the system keyring")
    return 0
