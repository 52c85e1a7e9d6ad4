"""Files and long pastes in a message: reading a file safely, finding `@path` in a prompt, completing a path,
and `message_text`, the one text the model sees for a message with attachments (the CLI, the TUI and the store
all build it here, so a chat reopened renders to the same tokens)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import AttachmentError

#: The largest file that can be attached. A bigger one would not fit a local model's context anyway, and
#: reading it whole would stall the app.
MAX_BYTES = 1_000_000
#: A NUL byte this early means a binary file: text files don't hold one, and binaries nearly always do.
SNIFF_BYTES = 8192
#: A paste longer than this many characters, or with more lines, is shown as a chip rather than inline.
PASTE_CHARS = 1000
PASTE_LINES = 8
#: Characters that end a sentence rather than a path: `see @notes.md.` names notes.md.
TRAILING_PUNCTUATION = ".,;:!?)]}'\""

__all__ = [
    "MAX_BYTES",
    "PASTE_CHARS",
    "PASTE_LINES",
    "Attachment",
    "AttachmentError",
    "complete_path",
    "find_references",
    "is_large_paste",
    "message_text",
    "paste_label",
    "read_attachment",
]


@dataclass(frozen=True)
class Attachment:
    #: The path as the user wrote it, or "pasted text".
    name: str
    content: str
    #: "file" or "paste".
    kind: str = "file"


def _resolve(path_text: str, cwd: Path) -> Path:
    try:
        path = Path(path_text).expanduser()
    except RuntimeError:  # ~name of a user who doesn't exist
        raise AttachmentError(f"can't attach '{path_text}': no such user's home folder") from None
    return path if path.is_absolute() else cwd / path


def read_attachment(path_text: str, cwd: Path) -> Attachment:
    """The text file at `path_text` (`~` expanded, relative to `cwd`); AttachmentError says in one line why not."""

    def refuse(reason: str) -> AttachmentError:
        return AttachmentError(f"can't attach '{path_text}': {reason}")

    if not path_text.strip():
        raise AttachmentError("can't attach a file without a path")
    path = _resolve(path_text, cwd)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise refuse("it is a folder; attach the files in it one by one")
        if not stat.S_ISREG(info.st_mode):
            raise refuse("it is not a regular file")  # a FIFO or a device would block or never end
        if info.st_size > MAX_BYTES:
            raise refuse(f"it is {info.st_size:,} bytes, over the {MAX_BYTES:,}-byte limit for an attachment")
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise refuse("no such file") from None
    except PermissionError:
        raise refuse("permission denied") from None
    except OSError as exc:
        raise refuse(exc.strerror or type(exc).__name__) from None
    if len(data) > MAX_BYTES:
        raise refuse(f"it is over the {MAX_BYTES:,}-byte limit for an attachment")
    if b"\0" in data[:SNIFF_BYTES]:
        raise refuse("it is a binary file; only text files can be attached")
    try:
        content = data.decode("utf-8-sig")  # a byte-order mark is no part of the text
    except UnicodeDecodeError as exc:
        raise refuse(f"it is not UTF-8 text (byte {exc.start:,} is not)") from None
    return Attachment(path_text, content, "file")


def _fence(content: str) -> str:
    """A backtick fence longer than any run of backticks in `content`, so the content can't close it."""
    longest = max((len(run) for run in re.findall("`+", content)), default=0)
    return "`" * max(3, longest + 1)


def message_text(text: str, attachments: list[Attachment]) -> str:
    """The message as the model sees it: each attachment's name on a line, then its content in a fenced block,
    a blank line between them, then the user's text. With no attachments it is `text` itself."""
    parts = []
    for attachment in attachments:
        fence = _fence(attachment.content)
        body = attachment.content if attachment.content.endswith("\n") else attachment.content + "\n"
        parts.append(f"{attachment.name}\n{fence}\n{body}{fence}")
    if text:
        parts.append(text)
    return "\n\n".join(parts)


_REFERENCE = re.compile(r"(?:^|(?<=\s))@(\S+)")


def find_references(text: str, cwd: Path | None = None) -> list[str]:
    """The paths of the `@path` references in `text`, in order, each once.

    A reference starts at the start of the text or after whitespace (so `a@b.com` is none) and runs to the next
    whitespace: a path with a space in it can't be named this way. Trailing TRAILING_PUNCTUATION is dropped,
    unless `cwd` is given and the path with it exists there. A word that doesn't look like a path (no `/`, no
    `.`, no leading `~`), such as `@alice`, is a mention, not a reference, unless such a file exists in `cwd`.
    """
    found: list[str] = []
    for match in _REFERENCE.finditer(text):
        path = match.group(1)
        exists = cwd is not None and _resolve_quietly(path, cwd).exists()
        if not exists:
            path = path.rstrip(TRAILING_PUNCTUATION)
            exists = cwd is not None and bool(path) and _resolve_quietly(path, cwd).exists()
        looks_like_path = "/" in path or "." in path or path.startswith("~")
        if path and (exists or looks_like_path) and path not in found:
            found.append(path)
    return found


def _resolve_quietly(path_text: str, cwd: Path) -> Path:
    try:
        return _resolve(path_text, cwd)
    except AttachmentError:
        return cwd / path_text


def complete_path(partial: str, cwd: Path, limit: int = 50) -> list[str]:
    """Completions of `partial`, a path relative to `cwd` or starting with `~`, as the user would type them:
    sorted, folders with a trailing `/`, hidden entries only when the part being typed starts with `.`."""
    if partial.startswith("~") and "/" not in partial:
        return ["~/"] if partial == "~" else []  # ~user is not completed
    head, slash, tail = partial.rpartition("/")
    head += slash
    folder = _resolve_quietly(head, cwd) if head else cwd
    try:
        with os.scandir(folder) as scan:
            entries = list(scan)
    except OSError:
        return []
    names = []
    for entry in entries:
        if not entry.name.startswith(tail) or (entry.name.startswith(".") and not tail.startswith(".")):
            continue
        try:
            folder_mark = "/" if entry.is_dir() else ""
        except OSError:
            folder_mark = ""
        names.append(f"{head}{entry.name}{folder_mark}")
    return sorted(names)[:limit]


def is_large_paste(text: str) -> bool:
    """Whether a paste is long enough to become a chip (more than PASTE_CHARS characters or PASTE_LINES lines)."""
    return len(text) > PASTE_CHARS or len(text.splitlines()) > PASTE_LINES


def paste_label(text: str) -> str:
    return f"pasted {len(text):,} chars"
