"""The exceptions pserv raises.

Every error of the engine is a :class:`PservError`; most classes also derive from the
matching built-in exception, so ``except TimeoutError`` or ``except ConnectionError``
catches them too. Bad arguments (wrong dtype, unsorted keys, ...) raise plain
``TypeError`` / ``ValueError`` before anything is sent.
"""

from __future__ import annotations

import builtins
from typing import Optional

__all__ = [
    "PservError",
    "TimeoutError",
    "ServerError",
    "DisconnectedError",
    "TransportError",
    "SchedulerGoneError",
    "RegistrationError",
    "InvalidRequestError",
    "UnknownTimestampError",
    "ConfigError",
    "IoError",
    "ClosedError",
    "ClusterError",
    "BinaryNotFoundError",
]


class PservError(Exception):
    """Base class of every pserv error."""


class TimeoutError(PservError, builtins.TimeoutError):
    """A wait, barrier or registration gave up after the worker's ``timeout`` (a server
    or the scheduler stopped answering). The task can be waited on again."""


class ServerError(PservError):
    """A server refused a request.

    Attributes:
        server: the server's rank.
        status: the status name (``"BadRequest"``, ``"WrongType"``, ``"UnknownFunction"``,
            ``"StoreError"``, ...).
        status_code: its numeric code.
        server_message: the server's explanation.
    """

    server: Optional[int] = None
    status: Optional[str] = None
    status_code: Optional[int] = None
    server_message: Optional[str] = None


class DisconnectedError(PservError, ConnectionError):
    """The connection to a server closed before it answered (and no other server took
    the request over). Attribute ``server``: its rank."""

    server: Optional[int] = None


class TransportError(PservError, ConnectionError):
    """A transport (socket) operation failed."""


class SchedulerGoneError(PservError, ConnectionError):
    """The connection to the scheduler closed (or the scheduler ended the job)."""


class RegistrationError(PservError):
    """The scheduler refused or never answered this worker's registration."""


class InvalidRequestError(PservError, ValueError):
    """The engine refused a request before sending it."""


class UnknownTimestampError(PservError, LookupError):
    """A wait on a timestamp that was never issued or whose result was already taken."""

    timestamp: Optional[int] = None


class ConfigError(PservError, ValueError):
    """A configuration error."""


class IoError(PservError, OSError):
    """A local I/O operation failed."""


class ClosedError(PservError):
    """The worker was finished or closed."""


class ClusterError(PservError):
    """A :class:`pserv.LocalCluster` could not start, or one of its processes failed."""


class BinaryNotFoundError(ClusterError, FileNotFoundError):
    """The ``pserv`` executable that :class:`pserv.LocalCluster` runs was not found."""
