"""Local path or Hugging Face hub name? And is the hub reachable? Answered in seconds, before any download.

``data`` (text corpora) and ``models`` (language models) both take "a path or a hub name"; this module
decides which one a string is and fails fast when a hub name cannot be fetched.

Example:
    >>> from focus_decoding.resources.hub import looks_like_path
    >>> looks_like_path("/no/such/file.txt"), looks_like_path("./corpus"), looks_like_path("owner/name")
    (True, True, False)
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

CONNECT_TIMEOUT_S = 3.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
FILE_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".gguf", ".safetensors", ".bin", ".pt", ".pth")


class HubUnavailable(ConnectionError):
    """A hub name was given but the hub cannot be reached (offline flag set, or no connection)."""


def looks_like_path(spec: str) -> bool:
    """True for strings no hub id can be: absolute, ``./``/``../``/``~``, several slashes, or a file suffix."""
    text = str(spec)
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
            or Path(text).suffix.lower() in FILE_SUFFIXES)


def env_true(name: str) -> bool:
    """An environment flag such as ``HF_HUB_OFFLINE=1`` is set."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline_reason(flags: tuple[str, ...] = OFFLINE_VARS) -> str | None:
    """Why the hub cannot be used now (an offline flag, or the endpoint unreachable), or None when it can."""
    for name in flags:
        if env_true(name):
            return f"{name} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint):
        return f"{endpoint} is unreachable"
    return None


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """TCP connect to the endpoint in a thread, so a hanging DNS lookup cannot block longer than ``timeout``."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    ok = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)
