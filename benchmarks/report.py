"""Editing the Markdown results pages the benchmark scripts write."""

from __future__ import annotations


def replace_section(md: str, heading: str, section: list[str]) -> str:
    """`md` with the section under `heading` replaced by `section` (appended when absent)."""
    lines = md.rstrip("\n").split("\n")
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        lines += [""] + section
    return "\n".join(lines).rstrip("\n") + "\n"
