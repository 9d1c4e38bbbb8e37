"""Exceptions of the ``streams`` package.

Every error raised on purpose by towerstream derives from :class:`TowerstreamError`,
so a caller can catch the whole family with one clause. Messages say what is wrong
and what to do about it.
"""

from __future__ import annotations

__all__ = ["TowerstreamError", "StreamsError", "EventValidationError", "ConfigError"]


class TowerstreamError(Exception):
    """Base of every error raised on purpose by towerstream."""


class StreamsError(TowerstreamError):
    """Base of the errors raised by the ``streams`` package."""


class ConfigError(TowerstreamError):
    """A setting (CLI flag, environment variable, config file) is invalid."""


class EventValidationError(StreamsError):
    """An event failed to decode or did not satisfy the event contract.

    ``reason`` is a short machine-friendly code (``"json"``, ``"schema_version"``,
    ``"missing_field"``, ``"type"``, ``"value"``, ``"unknown_field"``); the message
    is the human-readable explanation that goes to the dead-letter record.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason
