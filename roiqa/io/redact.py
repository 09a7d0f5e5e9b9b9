"""Keeping credentials out of logs, error messages and tables: secrets from the environment and URL parts masked."""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
# Environment variables whose values are credentials (AWS keys and session tokens, any *SECRET* / *TOKEN* /
# *PASSWORD* / *CREDENTIAL* variable, Ray's auth token).
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.I)
_MIN_SECRET = 6  # shorter values (flags like "1", "true") would mask ordinary words
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")
_SIGNED_PARAM = re.compile(
    r"((?:X-Amz-(?:Signature|Credential|Security-Token)|AWSAccessKeyId|Signature|x-amz-security-token|sig|token)=)"
    r"[^&\s'\"]+",
    re.I,
)
_SIGNED_QUERY = re.compile(  # a query-string parameter of a signed URL (S3, GCS, Azure SAS), in a URI
    r"[?&](?:X-Amz-(?:Signature|Credential|Security-Token)|X-Goog-(?:Signature|Credential)|AWSAccessKeyId|"
    r"Signature|sig|token)=",
    re.I,
)
_AUTH_HEADER = re.compile(r"((?:Authorization|X-Amz-Security-Token)['\"]?\s*[:=]\s*['\"]?)[^'\"\n}]+", re.I)


def is_secret_name(name: str) -> bool:
    """True for environment variable names that hold credentials."""
    return bool(_SECRET_NAME.search(name))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The credential values present in the environment, longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_name(k) and v and len(v) >= _MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """`text` with credential values, URL user-info, signed-URL parameters and auth headers masked."""
    if not text:
        return text
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _SIGNED_PARAM.sub(rf"\1{MASK}", text)
    return _AUTH_HEADER.sub(rf"\1{MASK}", text)


def has_credentials(uri: str) -> bool:
    """True when `uri` itself carries credentials: user-info (`s3://key:secret@bucket/...`) or signed-URL
    parameters (`?X-Amz-Signature=...`, `sig=`, `token=`)."""
    return bool(_USERINFO.search(uri) or _SIGNED_QUERY.search(uri))


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in every record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if redact(str(exc)) != str(exc):
                record.exc_info, record.exc_text = None, None
                record.msg = f"{clean} ({type(exc).__name__}: {redact(str(exc))})"
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Mask credentials in everything the root logger's handlers (or `logger`'s) write."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
