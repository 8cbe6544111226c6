"""Keeping credentials out of what the trainer prints and saves.

Credentials reach fsspec through the environment or its own configuration files, never
through the trainer's config; this is the second line of defence for anything that is
printed, logged or written into a checkpoint: passwords in URLs and values under
secret-looking keys are masked.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# Whole names or suffixes such as "key", "secret", "aws_secret_access_key", "session_token";
# not "max_tokens" or "mask_token_id".
_SECRET_KEY = re.compile(
    r"(?:^|_)(key|secret|password|passwd|token|credentials?|secret_access_key|session_token)$", re.IGNORECASE
)


def url_secrets(url: str) -> list[str]:
    """The user-info of a URL ("KEY:SECRET" and its parts), which libraries may echo without the scheme."""
    match = _URL_USERINFO.search(url or "")
    if not match:
        return []
    userinfo = match["userinfo"]
    return sorted({userinfo, *(part for part in userinfo.split(":") if len(part) >= 4)}, key=len, reverse=True)


def redact_text(text: str, *urls: str) -> str:
    """Mask URL user-info in `text`; also wherever the user-info of `urls` appears on its own."""
    text = _URL_USERINFO.sub(lambda match: f"{match['scheme']}{MASK}@", text)
    for secret in (secret for url in urls for secret in url_secrets(url)):
        text = text.replace(secret, MASK)
    return text


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with URL credentials and secret-looking keys masked."""
    if isinstance(value, dict):
        return {
            key: (MASK if isinstance(key, str) and _SECRET_KEY.search(key) and item not in (None, "") else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
