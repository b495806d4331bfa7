"""DeepSpeed's console chatter: its INFO/WARNING lines (accelerator detection, launcher commands, config
dumps, "get learning rate before the scheduler started") are hidden by default; errors always show.

FASTDIT_DEEPSPEED_LOG=info (or warning, debug) brings them back. The setting is read from the
environment, so one variable set for the launcher reaches every rank.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

ENV = "FASTDIT_DEEPSPEED_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _MinLevel(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def deepspeed_log_level() -> int:
    """The level DeepSpeed's logger shows: FASTDIT_DEEPSPEED_LOG, default error. Unknown -> ValueError."""
    name = os.environ.get(ENV, "error").strip().lower()
    if name not in LEVELS:
        raise ValueError(f"{ENV}={name!r} is not one of {', '.join(LEVELS)}")
    return LEVELS[name]


def quiet_deepspeed() -> int:
    """Filter DeepSpeed's logger ("DeepSpeed") below deepspeed_log_level(); works before or after
    `import deepspeed` (a filter survives the level DeepSpeed sets when it creates the logger)."""
    level = deepspeed_log_level()
    logger = logging.getLogger("DeepSpeed")
    for f in [f for f in logger.filters if isinstance(f, _MinLevel)]:
        logger.removeFilter(f)
    logger.addFilter(_MinLevel(level))
    if level > logging.WARNING:  # torch's deprecation notice for the collective DeepSpeed's ZeRO calls
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    return level


# A DeepSpeed log line: "[2026-11-26 19:03:39,360] [INFO] [launch.py:169:main] ..."
_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING)\] ")


def keep_line(line: bytes, level: int) -> bool:
    """Whether a line of a launcher's output passes: DeepSpeed log lines below `level` do not."""
    m = _LINE.match(line)
    return m is None or LEVELS[m.group(1).decode().lower()] >= level


def filter_stream(src_fd: int, dst, level: int) -> None:
    """Copy the output of DeepSpeed's launcher (and its ranks) from src_fd to the binary stream dst
    as it comes, without DeepSpeed's log lines below `level`. Text that cannot start such a line (a
    progress bar's \\r updates) is passed on at once, not held until its newline."""
    held = b""
    while True:
        chunk = os.read(src_fd, 65536)
        if not chunk:
            break
        held += chunk
        *lines, held = held.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if keep_line(line, level))
        if held and not held.startswith(b"["):
            out, held = out + held, b""
        if out:
            dst.write(out)
            dst.flush()
    if held and keep_line(held, level):
        dst.write(held)
        dst.flush()
