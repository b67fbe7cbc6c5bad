"""Telling "a server is down or unreachable" from a defect, for one line instead of a traceback.

A command run while Redis or PostgreSQL is away should say so and exit 1; the daemon starting
before its database should wait for it. Anything else still surfaces as the error it is.
"""

from __future__ import annotations

import errno
import socket

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_POSTGRES_AWAY = (
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidCatalogNameError,  # the database does not exist (yet)
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    ConnectionError,  # refused, reset: asyncpg raises the socket's own errors
    socket.gaierror,  # the host name does not resolve
)
# Other socket errors that mean "the server cannot be reached", by errno; any other OSError
# (a file, a permission) is not an outage and keeps its traceback.
_UNREACHABLE_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ETIMEDOUT, errno.EADDRNOTAVAIL}
)


def outage(exc: BaseException) -> str | None:
    """What is unreachable, in one line, when `exc` (or what caused it) says a server is away."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        if isinstance(error, RedisConnectionError | RedisTimeoutError):
            return f"cannot reach Redis: {first_line(error)}"
    for error in chain:
        if isinstance(error, TimeoutError):
            return f"PostgreSQL did not answer in time: {first_line(error)}"
        if isinstance(error, _POSTGRES_AWAY) or (
            isinstance(error, OSError) and error.errno in _UNREACHABLE_ERRNOS
        ):
            return f"cannot reach PostgreSQL: {first_line(error)}"
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
