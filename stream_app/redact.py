"""Secrets never reach a log line or an error message: URLs keep only scheme and host, credentials go.

A webhook URL carries its token in the path (Slack: ``/services/T…/B…/secret``) or the query, a broker or
proxy URL in its user-info; an HTTP error may quote an ``Authorization`` header; AWS errors may quote an
access key id or a signature. :func:`redact` masks all of them; :func:`install` makes every log record of
the process pass through it (message, arguments and traceback text).

>>> redact("POST https://hooks.slack.com/services/T0/B0/abcdef?x=1 failed")
'POST https://hooks.slack.com/… failed'
>>> redact("http://user:pw@127.0.0.1:8080/hook refused; Authorization: Bearer eyJhbGci.x")
'http://127.0.0.1:8080/… refused; Authorization: …'
>>> redact("key AKIAIOSFODNN7EXAMPLE, aws_secret_access_key=wJalrXUtnFEMI/K7MDENG sasl_password='p'")
'key AKIA…, aws_secret_access_key=… sasl_password=…'
"""

from __future__ import annotations

import logging
import re

__all__ = ["redact", "redact_url", "install"]

_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^\s@'\"<>]*@)?([^/\s?#'\"<>]*)([^\s'\"<>]*)")
_AUTH = re.compile(r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token|aws4-hmac-sha256)\s+)?"
                   r"[^\s,;\"']+(?:\s*,\s*[A-Za-z]+=[^\s,;\"']+)*")
_AWS_KEY_ID = re.compile(r"\b((?:AKIA|ASIA|AIDA|AROA))[A-Z0-9]{12,}\b")
_NAMED_SECRET = re.compile(r"(?i)\b((?:aws_secret_access_key|aws_session_token|secret_access_key|session_token|"
                           r"sasl_password|password|passwd|secret|api_key|apikey|access_token|token|"
                           r"x-amz-signature|x-amz-security-token|signature)[\"']?\s*[:=]\s*)(?:'[^']*'|\"[^\"]*\"|[^\s,;&\"']+)")


def redact_url(url: str) -> str:
    """``url`` with its user-info, path, query and fragment masked: ``https://host:port/…``."""
    return redact(url)


def _url(match: re.Match) -> str:
    scheme, host, rest = match.groups()
    return f"{scheme}{host}/…" if rest and rest != "/" else f"{scheme}{host}{rest}"


def redact(text: str) -> str:
    """``text`` with URLs cut to their host and every credential-looking value replaced by ``…``."""
    text = _URL.sub(_url, text)
    text = _AUTH.sub(r"\1…", text)
    text = _AWS_KEY_ID.sub(r"\1…", text)
    return _NAMED_SECRET.sub(r"\1…", text)


_installed = False


def install() -> None:
    """Redact every log record this process makes, whichever logger and handler (idempotent)."""
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 — a bad format string: let the handler report it as usual
            return record
        clean = redact(message)
        if clean != message:  # only a record that held a secret is rewritten; () as handlers expect a tuple
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(redacting_record)
    _installed = True
