"""Secrets never reach logs or run directories."""

from __future__ import annotations

import re
from typing import Any

# whole words of a key: `hf_token`, `api_key`, `password` are secrets; `tokenizer` is not,
# nor are plural `tokens` (`model.add_tokens`, `max_new_tokens` are settings, not secrets)
SECRET = re.compile(
    r"(^|[_\-.])(token|secrets?|passwords?|passwd|api[_-]?keys?|credentials?)($|[_\-.])",
    re.IGNORECASE,
)
REDACTED = "***"


def redact(data: Any) -> Any:
    """Copy of `data` with the values of secret-looking keys replaced by ***."""
    if isinstance(data, dict):
        return {
            k: (REDACTED if SECRET.search(str(k)) and v is not None else redact(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data
