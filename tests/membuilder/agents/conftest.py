from datetime import datetime

import pytest

from membuilder.bank import MemoryBank
from membuilder.datasets import Message, Session
from membuilder.embedders import HashingEmbedder
from membuilder.store import InMemoryStore


def make_session(turns, session_id="session_1", date=datetime(2023, 5, 8, 13, 56),
                 date_text="1:56 pm on 8 May, 2023", prefix="D1"):
    """turns: [(speaker, text), ...] -> Session with turn ids D1:1, D1:2, ..."""
    speakers = list(dict.fromkeys(s for s, _ in turns))
    messages = tuple(Message(speaker=s, role="user" if s == speakers[0] else "assistant", text=t,
                             turn_id=f"{prefix}:{i + 1}") for i, (s, t) in enumerate(turns))
    return Session(session_id=session_id, date=date, date_text=date_text, messages=messages)


@pytest.fixture
def bank(clock):
    store = InMemoryStore()
    yield MemoryBank(store, "conv-test", embedder=HashingEmbedder(dim=64), clock=clock)
    store.close()
