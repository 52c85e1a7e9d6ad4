"""One error hierarchy. Every message is a single line a user can act on."""


class ChatappError(Exception):
    """A failure we expected and can explain in one line."""


class ModelNotFound(ChatappError):
    """A model reference that names nothing we can load."""


class ModelLoadError(ChatappError):
    """A model that exists but can't be loaded as asked."""


class HubError(ChatappError):
    """The Hub refused, could not be reached, or the repo is gated."""


class ContextOverflow(ChatappError):
    """A single message that can't fit in the model's context even alone."""


class AttachmentError(ChatappError):
    """A file that can't go into a message: missing, unreadable, binary, not UTF-8 or too big."""


class RemoteError(ChatappError):
    """A remote OpenAI-compatible server refused, failed or could not be reached."""


class ConfigError(ChatappError):
    """A bad value in a config or catalog file."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none.

    A first line that ends in a colon introduces the lines after it ("...from one of:"), so then they are all
    joined into the one line: cut there, the message would stop short."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return " ".join(lines) if lines[0].endswith(":") else lines[0]
