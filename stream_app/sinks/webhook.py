"""The webhook sink: Slack-compatible JSON (``text`` + ``attachments``) POSTed to a URL from the env.

The URL comes from ``LOSSGUARD_WEBHOOK_URL`` (or the variable named by ``url_env``), so secrets stay
out of the routes file, and the URL is never logged nor quoted in an error (only its host). A 4xx answer
other than 408/429 raises :class:`PermanentDeliveryError` (the alert is dead-lettered); any other non-2xx
answer or a network error raises :class:`DeliveryError`; the runner retries with backoff and does not commit
the alert's offset until the endpoint took it.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from detectors import Alert
from detectors.config import ConfigError

from ..redact import redact_url
from . import DeliveryError, PermanentDeliveryError, Sink

__all__ = ["WebhookSink", "slack_payload"]

_COLOURS = {"critical": "#b00000", "high": "#e05000", "medium": "#e0a000", "low": "#3080c0"}
_RESOLVED = "#2eb67d"


def slack_payload(alert: Alert, reason: str) -> dict[str, Any]:
    """A Slack incoming-webhook message for ``alert`` (``reason``: new / escalated / resolved)."""
    head = {"escalated": "ESCALATED ", "resolved": "RESOLVED "}.get(reason, "")
    if alert.status == "resolved":
        head = "RESOLVED "
    return {
        "text": f"{head}[{alert.severity.upper()}] {alert.run_id}: {alert.alert_type} at step {alert.step}",
        "attachments": [{
            "color": _RESOLVED if alert.status == "resolved" else _COLOURS[alert.severity],
            "text": alert.message,
            "fields": [{"title": "run", "value": alert.run_id, "short": True},
                       {"title": "detector", "value": alert.detector, "short": True},
                       {"title": "category", "value": alert.category, "short": True},
                       {"title": "step", "value": str(alert.step), "short": True}],
            "footer": f"lossguard alert {alert.alert_id}",
            "ts": int(alert.ts),
        }],
    }


class WebhookSink(Sink):
    paging = True

    def __init__(self, url_env: str = "LOSSGUARD_WEBHOOK_URL", timeout_s: float = 5.0, settings: Any = None,
                 **_context: Any):
        self.url = os.environ.get(url_env) or (settings.webhook_url if settings else "")
        if not self.url:
            raise ConfigError(url_env, "the webhook sink needs a URL in this environment variable")
        self.timeout_s = timeout_s
        # user-info in the URL (https://user:token@host/...) becomes a Basic Authorization header: urllib
        # would take it for part of the host name
        parts = urllib.parse.urlsplit(self.url)
        self._headers = {"Content-Type": "application/json"}
        if parts.username is not None:
            credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
            self.url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))

    def deliver(self, alert: Alert, reason: str) -> None:
        body = json.dumps(slack_payload(alert, reason)).encode()
        request = urllib.request.Request(self.url, data=body, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            permanent = 400 <= exc.code < 500 and exc.code not in (408, 429)
            error = PermanentDeliveryError if permanent else DeliveryError
            raise error(f"webhook {redact_url(self.url)} answered HTTP {exc.code} to alert {alert.alert_id}") \
                from None
        except (urllib.error.URLError, OSError) as exc:
            raise DeliveryError(f"webhook {redact_url(self.url)} did not take alert {alert.alert_id}: "
                                f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
