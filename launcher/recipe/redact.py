"""Secrets never reach logs or run directories."""

from __future__ import annotations

import re
from typing import Any

_SECRET = re.compile(r"(token|secret|password|passwd|api_?key|credential)", re.IGNORECASE)
REDACTED = "***"


def redact(data: Any) -> Any:
    """Copy of `data` with the values of secret-looking keys replaced by ***."""
    if isinstance(data, dict):
        return {
            k: (REDACTED if _SECRET.search(str(k)) and v is not None else redact(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data
