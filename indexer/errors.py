"""Exceptions of the ``indexer`` package (all derive from :class:`IndexerError`)."""

from __future__ import annotations

from streams.errors import TowerstreamError

__all__ = ["IndexerError", "ArtifactError", "BuildError", "NoIndexError", "CatalogueError"]


class IndexerError(TowerstreamError):
    """Base of the errors raised by the ``indexer`` package."""


class ArtifactError(IndexerError):
    """A version directory is missing, incomplete or does not match its manifest."""


class BuildError(IndexerError):
    """An index could not be built from the given vectors (shape, values, settings)."""


class NoIndexError(IndexerError):
    """A search was asked of a holder that has no index yet (nothing published or loaded)."""


class CatalogueError(IndexerError):
    """A catalogue record (file line or topic record) is malformed."""
