"""The Hugging Face hub from a machine that may be offline: found out once, in seconds.

Why: offline, transformers and datasets retry the hub with backoff before failing (a default
`peftlab train` spent about 53 s and printed 12 retry lines before its error). One TCP
connection attempt tells whether the hub can be reached; when it cannot, models and
tokenizers load from the local cache only (`local_files_only`), which fails at once when
nothing is cached, with our message saying what to do.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def offline_by_setting() -> bool:
    """The user said so: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set."""
    return any(os.environ.get(k, "").lower() in _TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this process open a connection to the hub (HF_ENDPOINT, default huggingface.co)?"""
    if offline_by_setting():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        _offline_for_this_process()
        return False
    return True


def _offline_for_this_process() -> None:
    """huggingface_hub's offline mode from here on: `local_files_only` does not reach every
    request (transformers 5 still asked the hub for a model's adapter_config.json, five
    retries with backoff: 29 s before the error)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    # read from the environment at import: set here for this process only (a user's setting
    # stays theirs, and `offline_by_setting` still tells it from this)
    constants.HF_HUB_OFFLINE = True


def download_hint(name: str, what: str) -> str:
    """How to get `name` onto a machine without internet (huggingface_hub's CLI is `hf`)."""
    return (f"If this machine has no internet, download it elsewhere "
            f"(`hf download {name} --local-dir DIR`), copy DIR here and set `{what}: DIR`")
