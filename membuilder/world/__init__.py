"""The bundled synthetic dialogue world: seeded multi-session chats between two people with the
exact expert answer of each memory agent and exact QA of every type (DESIGN section 4).

    world = generate_world(0, conversations=2, sessions=4)
    conv = world.conversations[0].conversation          # membuilder.datasets.Conversation
    bank, records = build_expert_memory(world.conversations[0])
    world.conversations[0].session_qa(0)                 # reward.types.QAPair dicts

No data files: the word lists are in `vocab.py`. See `generator.py` for what a world holds.
"""

from .dates import date_text, resolve_relative
from .expert import WorldExpert, build_expert_memory
from .generator import generate_conversation, generate_world
from .model import QTYPES, CoreIntent, EntryIntent, SessionPlan, World, WorldConversation, WorldQA
from .qa import MIN_SESSION_QA

DEFAULT_CONVERSATIONS = 10
DEFAULT_SESSIONS = 20


def load_world(seed: int = 0, *, conversations: int = DEFAULT_CONVERSATIONS,
               sessions: int = DEFAULT_SESSIONS):
    """The world's conversations in the dataset format (what `load_dataset("world")` returns)."""
    return generate_world(seed, conversations=conversations, sessions=sessions).dataset()


__all__ = [
    "CoreIntent", "DEFAULT_CONVERSATIONS", "DEFAULT_SESSIONS", "EntryIntent", "MIN_SESSION_QA", "QTYPES",
    "SessionPlan", "World", "WorldConversation", "WorldExpert", "WorldQA", "build_expert_memory", "date_text",
    "generate_conversation", "generate_world", "load_world", "resolve_relative",
]
