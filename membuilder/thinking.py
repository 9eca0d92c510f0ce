"""Think-block removal: the one implementation shared by the agents' parser, the judge and answering.

Reasoning models wrap their thinking in `<think>...</think>` (tags matched case-insensitively).
The visible answer of a raw completion is what is left after these rules, applied left to right:

1. every complete block `<think>...</think>` is removed (a block ends at the first `</think>`
   after its `<think>`; a `<think>` inside a block is part of the thinking);
2. an orphan `</think>` (one with no open block before it) means the chat template opened the
   block inside the prompt: everything before the last orphan `</think>` is thinking and dropped;
3. a `<think>` that is never closed means the model was cut off while thinking: everything from
   it on is dropped.

One pass over the tag positions, so the cost is linear in the text's length whatever the number
of tags (a regex `<think>.*?</think>` rescans the rest of the text from every unclosed tag, which
is quadratic on hostile output).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ThinkStripped", "strip_think_blocks"]

_TAG = re.compile(r"<(/?)think>", re.I)


@dataclass(frozen=True)
class ThinkStripped:
    """The visible text of a completion and what unusual think-blocks were found in it."""

    text: str
    blocks: int  # complete <think>...</think> blocks removed
    orphan_close: bool  # an unopened </think> was found; the text before it was dropped
    unterminated: bool  # a <think> was never closed; the text from it on was dropped

    @property
    def note(self) -> str | None:
        """A short explanation of the unusual case (unterminated wins: it is the later cut)."""
        if self.unterminated:
            return "an unterminated <think> block was dropped (output cut off while thinking?)"
        if self.orphan_close:
            return "an unopened </think> was found; the text before it was dropped"
        return None


def strip_think_blocks(text: str) -> ThinkStripped:
    """Apply the module's three rules to `text` in one linear pass."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    kept: list[str] = []  # visible segments since the last orphan </think>
    pos = 0  # start of the current visible segment
    open_at: int | None = None  # start of the open block, when inside one
    blocks = 0
    orphan = False
    for m in _TAG.finditer(text):
        closing = m.group(1) == "/"
        if open_at is None:
            if closing:  # rule 2: drop everything seen so far
                kept.clear()
                orphan = True
                pos = m.end()
            else:
                kept.append(text[pos:m.start()])
                open_at = m.start()
        elif closing:  # rule 1: the block ends here
            blocks += 1
            open_at = None
            pos = m.end()
        # a <think> inside an open block is thinking text: nothing to do
    unterminated = open_at is not None
    if not unterminated:  # rule 3 otherwise: nothing after the unclosed <think> is kept
        kept.append(text[pos:])
    return ThinkStripped("".join(kept), blocks, orphan, unterminated)
