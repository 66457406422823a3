"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

# full disk, read-only or forbidden folder, quota: every later write would fail the same way
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT}


class PeftlabError(Exception):
    """An error caused by the user's input or environment, with a message that says what to fix."""


class ConfigError(PeftlabError):
    """A config value is missing, unknown or out of range."""


class DataError(PeftlabError):
    """A data file is missing or malformed; the message names the file and line."""


class CheckpointError(PeftlabError):
    """A training checkpoint cannot be resumed from (unreadable, or not this run's)."""


class ModelLoadError(PeftlabError):
    """A model or tokenizer could not be loaded."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> ConfigError:
    choices = sorted(choices)
    return ConfigError(
        f"unknown {kind} `{name}`{did_you_mean(name, choices)}; choose one of: {', '.join(choices)}"
    )


STORAGE_HINTS = {28: "the disk is full", 30: "the file system is read-only",
                 13: "permission denied", 20: "a path component is a file, not a folder"}


def describe_cause(e: OSError) -> str:
    """A storage error's cause in words (the disk is full, ...)."""
    return STORAGE_HINTS.get(e.errno, e.strerror or type(e).__name__)


def describe_os_error(e: OSError) -> str:
    """A disk-full, read-only or permission error as one sentence that names the path."""
    where = f" `{e.filename}`" if e.filename else ""
    reason = describe_cause(e)
    return (f"cannot write or read{where}: {reason}. Files already written are complete "
            "(every result file is written atomically); free space or fix the folder, then "
            "run the same command again to resume.")
