"""Library log records and Python warnings go to a log file in the data dir, not the terminal.

Our own messages are one-line prints on stderr (cli._note); what torch, transformers, huggingface_hub,
bitsandbytes or accelerate log (through `logging` or `warnings`) would bury them, so it goes to
<data_dir>/chatapp.log. The worker process has its own worker.log (engine/worker.py).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOG_NAME = "chatapp.log"
_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


class _LogFile(logging.handlers.RotatingFileHandler):
    """The log file, opened (and its folder made) at the first record, so a quiet run writes nothing."""

    def __init__(self, path: Path):
        super().__init__(path, maxBytes=1 << 20, backupCount=1, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter(_FORMAT))

    def _open(self):
        from .private import private_dir, private_file

        private_dir(Path(self.baseFilename).parent)
        stream = super()._open()
        private_file(Path(self.baseFilename))
        return stream

    def handleError(self, record: logging.LogRecord) -> None:
        # The data dir can't be written: the record goes to the terminal rather than nowhere (and no traceback).
        try:
            sys.stderr.write(f"{record.name}: {record.getMessage()}\n")
        except Exception:
            pass


def log_path(data_dir: Path) -> Path:
    return Path(data_dir) / LOG_NAME


def route_library_logs(data_dir: Path) -> Path:
    """Send every logger's records (WARNING and up) and every shown warning to <data_dir>/chatapp.log."""
    path = log_path(data_dir)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LogFile)]:
        root.removeHandler(handler)
        handler.close()
    # bitsandbytes and accelerate log through plain module loggers, which propagate to the root.
    root.addHandler(_LogFile(path))
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the root -> the file
    # huggingface_hub gives its package logger a stderr handler when it is first imported; import it now
    # (its logging module is light) and hand its records to the root instead.
    import huggingface_hub.utils.logging  # noqa: F401

    _drop_stderr_handlers("huggingface_hub")
    return path


def adopt_transformers_logging() -> None:
    """transformers sets up a stderr handler on its package logger (and stops propagation): undo both.

    Called where transformers is imported anyway (the engine commands), since importing it takes a second.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def _drop_stderr_handlers(name: str) -> None:
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:  # exactly: a FileHandler is a StreamHandler too
            logger.removeHandler(handler)
    logger.propagate = True
