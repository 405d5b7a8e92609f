"""Requests to an OpenAI-compatible HTTP API, shared by the LLM judge and the `openai` generation backend.

    client = OpenAIClient.from_config("http://127.0.0.1:8080/v1", config)   # an HTTPClientConfig
    reply = client.post("completions", {"model": "m", "prompt": [1, 2, 3]})  # the JSON reply

Each request has a timeout and is retried with exponential backoff after a timeout, a connection error, a
429 or a 5xx; never after another 4xx (the request itself is wrong) or a reply that is not JSON. A request
that still fails raises `RequestFailed`, a one-line DpokitError naming the URL and the last failure. The
API key comes from an environment variable, is sent only as the Bearer token, and is kept out of repr,
logs and error messages.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from dpokit.errors import DpokitError
from dpokit.online.config import HTTPClientConfig


class RequestFailed(DpokitError):
    """A request that failed for good: after its retries, or at once for a 4xx or a reply that is not JSON."""


class _Retryable(Exception):
    """A failure worth retrying: timeout, connection error, 429 or 5xx."""


def read_api_key(variable: str | None, owner: str) -> str | None:
    """The key in environment variable `variable` (None: no key); `owner` names the config section."""
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise DpokitError(f"{owner}: environment variable {variable} (api_key_env) is not set")
    return key


@dataclass
class OpenAIClient:
    url: str  # the API's base URL, e.g. http://127.0.0.1:8080/v1
    timeout_s: float
    retries: int
    backoff_s: float
    key: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, url: str, config: HTTPClientConfig, owner: str) -> OpenAIClient:
        key = read_api_key(config.api_key_env, owner)
        return cls(url.rstrip("/"), config.timeout_s, config.retries, config.backoff_s, key)

    def _post_once(self, address: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(address, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as error:  # before URLError: it is one
            if error.code == 429 or error.code >= 500:
                raise _Retryable(f"HTTP {error.code}") from None
            raise RequestFailed(f"{address}: HTTP {error.code}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
            raise _Retryable(type(error).__name__) from None
        except ValueError:
            raise RequestFailed(f"{address}: the reply is not JSON") from None
        if not isinstance(reply, dict):
            raise RequestFailed(f"{address}: the reply is not a JSON object")
        return reply

    def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON object that POST URL/route answers, after up to `retries` retries; raises RequestFailed."""
        address = f"{self.url}/{route}"
        for attempt in range(self.retries + 1):
            try:
                return self._post_once(address, body)
            except _Retryable as error:
                failure = error
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2**attempt)
        raise RequestFailed(f"{address}: failed after {self.retries + 1} attempts (last: {failure})")
