"""Shared test setup: offline Hugging Face, a per-machine model cache, paths to ../shared data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# The Hub is unreachable here: fail fast instead of retrying for ~50 s per lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISTILRAY_CACHE", str(Path(tempfile.gettempdir()) / "distilray-test-cache"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTILRAY_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (tests read real data from ../shared/data)")
    return path


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    return shared_path("sst2")


@pytest.fixture(scope="session")
def imdb_dir() -> Path:
    return shared_path("imdb")
