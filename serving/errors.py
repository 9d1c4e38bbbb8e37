"""Exceptions of the ``serving`` package (all derive from :class:`ServingError`)."""

from __future__ import annotations

from streams.errors import TowerstreamError

__all__ = ["ServingError", "NotReadyError", "BadRequestError"]


class ServingError(TowerstreamError):
    """Base of the errors raised by the ``serving`` package."""


class NotReadyError(ServingError):
    """No model or no index is loaded yet, so nothing can be scored; the message says which."""


class BadRequestError(ServingError):
    """A scoring request is malformed (HTTP 400); the message says what to fix."""
