"""Failure handling for model calls: what is transient, how long to wait, when to stop trying."""

from __future__ import annotations

import enum
import importlib
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

from google.genai import errors

# 408 request timeout, 429 quota, and the 5xx that mean "try again" (not 501).
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Credentials or model name wrong: every call will fail the same way, so it counts as "down".
BROKEN_STATUS = frozenset({401, 403, 404})


def _optional_types(names: Iterable[tuple[str, str]]) -> tuple[type[BaseException], ...]:
    """Transport exception classes of whichever HTTP stacks the SDK may be using."""
    found: list[type[BaseException]] = []
    for module_name, attr in names:
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,
    *_optional_types(
        [
            ("aiohttp", "ClientConnectionError"),
            ("aiohttp", "ClientPayloadError"),
            ("httpx", "TransportError"),
            ("httpx2", "TransportError"),
        ]
    ),
)


def status_code(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, errors.APIError) else None


def is_transient(exc: BaseException) -> bool:
    """Worth another attempt: rate limited, server trouble, connection lost, timed out."""
    code = status_code(exc)
    if code is not None:
        return code in TRANSIENT_STATUS
    return isinstance(exc, TRANSPORT_ERRORS)


def marks_down(exc: BaseException) -> bool:
    """Counts against the circuit breaker: the model (or our access to it) is not working.

    A 400 for one oversized or odd request says the service is up, so it does not count.
    """
    code = status_code(exc)
    if code is not None:
        return code in TRANSIENT_STATUS or code in BROKEN_STATUS
    return True


def _header(headers: Any, name: str) -> str | None:
    if not isinstance(headers, Mapping) and not hasattr(headers, "items"):
        return None
    for key, value in headers.items():
        if str(key).lower() == name:
            return str(value)
    return None


def _parse_retry_after(value: str, now: Callable[[], float]) -> float | None:
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())


def _retry_info_delay(details: Any) -> float | None:
    """google.rpc.RetryInfo in the error body: {"retryDelay": "1.5s"}."""
    error = details.get("error", details) if isinstance(details, Mapping) else None
    items = error.get("details") if isinstance(error, Mapping) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping):
            continue
        delay = item.get("retryDelay")
        if str(item.get("@type", "")).endswith("google.rpc.RetryInfo") and isinstance(delay, str):
            try:
                return max(0.0, float(delay.removesuffix("s")))
            except ValueError:
                return None
    return None


def retry_after_s(exc: BaseException, *, now: Callable[[], float] = time.time) -> float | None:
    """How long the server asked us to wait: the Retry-After header, else the body's RetryInfo."""
    if not isinstance(exc, errors.APIError):
        return None
    header = _header(getattr(exc.response, "headers", None), "retry-after")
    if header is not None:
        parsed = _parse_retry_after(header, now)
        if parsed is not None:
            return parsed
    return _retry_info_delay(exc.details)


def failure_kind(exc: BaseException) -> str:
    """The failure as one of a few words, for a metric label (bounded, unlike messages)."""
    if isinstance(exc, errors.APIError):
        code = exc.code or 0
        if code == 429:
            return "rate_limited"
        return "server_error" if code >= 500 else "client_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):  # refused, reset, unresolved: aiohttp's connection errors too
        return "unreachable"
    return "unavailable"


def describe(exc: BaseException) -> str:
    """A short, secret-free reason for logs and exceptions."""
    if isinstance(exc, errors.APIError):
        return f"{exc.code} {exc.status or ''}".strip()
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive failures open it; after `reset_timeout_s` one probe call may go through.

    The probe's success closes it, its failure opens it again for another `reset_timeout_s`.
    Not thread-safe; meant for one event loop, where the check-and-claim cannot interleave.
    """

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_timeout_s <= 0:
            raise ValueError("failure_threshold >= 1 and reset_timeout_s > 0 required")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self.reset_timeout_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def retry_in_s(self) -> float:
        """Seconds until a probe may go through (0 when calls are allowed now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """May a call go through now? In half-open state this claims the single probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
        self._probing = False

    def release(self) -> None:
        """The call proved nothing (cancelled): give the probe back without a verdict."""
        self._probing = False
