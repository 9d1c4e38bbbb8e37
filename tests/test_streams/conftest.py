"""Fixtures of the ``streams`` tests: where the MovieLens data is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
_DEFAULT_ML100K = _REPO.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def movielens_path() -> Path:
    """The ml-100k folder: ``$TOWERSTREAM_ML100K``, else ``<repo>/../shared/data/ml-100k``.

    Skips when the data is not there, unless ``TOWERSTREAM_REQUIRE_DATA=1``: then it fails.
    """
    path = Path(os.environ.get("TOWERSTREAM_ML100K") or _DEFAULT_ML100K)
    if not (path / "u.data").is_file():
        message = (f"MovieLens ml-100k not found at {path} (no u.data); "
                   "set TOWERSTREAM_ML100K to the unzipped ml-100k folder")
        if os.environ.get("TOWERSTREAM_REQUIRE_DATA") == "1":
            pytest.fail(f"data required (TOWERSTREAM_REQUIRE_DATA=1): {message}", pytrace=False)
        pytest.skip(message)
    return path
