"""Think-block stripping: one implementation, checked against the regex formulation it replaces."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from membuilder.thinking import strip_think_blocks

_BLOCK = re.compile(r"<think>.*?</think>", re.S | re.I)
_OPEN = re.compile(r"<think>", re.I)
_CLOSE = re.compile(r"</think>", re.I)


def _reference(text: str) -> str:
    """The three rules as three regex passes (quadratic, fine on small inputs)."""
    text = _BLOCK.sub("", text)
    closes = list(_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opened = _OPEN.search(text)
    return text[: opened.start()] if opened else text


def test_worked_cases():
    s = strip_think_blocks("<think>plan</think>Paris")
    assert (s.text, s.blocks, s.orphan_close, s.unterminated, s.note) == ("Paris", 1, False, False, None)
    # the chat template opened the block in the prompt: only the closing tag is in the output
    s = strip_think_blocks("reasoning about Rome</think> Paris")
    assert s.text == " Paris" and s.orphan_close and "unopened" in s.note
    # cut off while thinking: nothing after the open tag is an answer
    s = strip_think_blocks("Paris <THINK>but maybe Rome")
    assert s.text == "Paris " and s.unterminated and "unterminated" in s.note
    # a <think> inside a block is thinking; the block ends at the first </think>, so the second
    # </think> is an orphan: "a" + "d" is dropped with it, leaving "e"
    assert strip_think_blocks("a<think>b<think>c</think>d</think>e").text == "e"
    assert strip_think_blocks("a<think>b<think>c</think>d").text == "ad"
    # orphan close wins over the text before it, including a complete block
    assert strip_think_blocks("x<think>y</think>z</think>w").text == "w"


# fragments that cannot splice into a new tag when a block between them is removed
_pieces = st.sampled_from(["<think>", "</think>", "<Think>", "</THINK>", "a", "b ", "{", "\n", "<", ">"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=30))
def test_matches_the_regex_formulation(pieces):
    text = "".join(pieces)
    # "<" then "think>" could splice into a tag only if a removed block sat between them; the
    # alphabet has no "think>" fragment, so both formulations see the same tags
    assert strip_think_blocks(text).text == _reference(text)
