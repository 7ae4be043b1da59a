"""Whether the Hugging Face Hub can be reached, asked once per process, so that a hub name fails at once offline.

Unreachable (no DNS, no route, or HF_HUB_OFFLINE set), every later hub access runs in offline mode: transformers,
tokenizers and datasets use what is in the local cache and fail at once otherwise, instead of retrying for a minute
before the same error. The probe is one TCP connection with a 3 s timeout, made only when a name is not a local path.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse


@functools.lru_cache(maxsize=None)
def offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return False
    except OSError:
        _go_offline()
        return True


def _go_offline() -> None:
    """Offline mode for this process, including libraries already imported (they read the variable at import)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
        ("transformers.utils.hub", ("_is_offline_mode",)),
    ):
        m = sys.modules.get(module)
        for name in names:
            if m is not None and hasattr(m, name):
                setattr(m, name, True)


def hub_name(path) -> bool:
    """A name to look up on the Hub rather than a local folder or file."""
    return path is not None and not Path(str(path)).exists()


def offline_hint(what: str) -> str:
    return (
        f"{what} is not a local path, the Hugging Face Hub is not reachable from here, and it is not in the local "
        f"cache: use a local copy (a folder, or kind=local with a path) or download it where there is network"
    )
