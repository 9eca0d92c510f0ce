import itertools

import pytest

from membuilder.store import InMemoryStore, SQLiteStore


class FakeClock:
    """Deterministic clock: 1000.0, 1001.0, ... so timestamps are exact in comparisons."""

    def __init__(self, start: float = 1000.0):
        self._it = itertools.count(start)

    def __call__(self) -> float:
        return float(next(self._it))


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    """Every store implementation, so one suite covers both."""
    s = InMemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "bank.sqlite")
    yield s
    s.close()


@pytest.fixture
def clock():
    return FakeClock()
