"""The ledger language: what a user says about named variables, and the facts a store extracts from it.

Glossary: a variable is a lowercase name holding an integer 0..99; a day is an integer time.

Every utterance of a ledger dialogue is one of these lines (the harness writes them, the fact-keeping stores read
them with `extract_facts`; anything else is chit-chat and yields no fact):

    set kobu to 12.            -> Fact("kobu", "set", 12)      a variable is introduced
    change kobu to 40.         -> Fact("kobu", "change", 40)   its value is updated
    kobu is still 40.          -> Fact("kobu", "still", 40)    restated (nothing new)
    drop kobu.                 -> Fact("kobu", "drop", None)   it no longer exists
    remember to check kobu.    -> no fact (a distractor that names a variable)

A fact kept by a store is written `"kobu = 40"` (`fact_text`); `parse_fact_text` reads it back. mem0 extracts facts
with an LLM; here the grammar is exact, so a store's decisions (ADD/UPDATE/DELETE/NOOP) are checkable.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["Fact", "extract_facts", "fact_text", "parse_fact_text", "NAME_RE"]

NAME_RE = r"[a-z]+"
_PATTERNS = (
    (re.compile(rf"^set ({NAME_RE}) to (\d+)\.$"), "set"),
    (re.compile(rf"^change ({NAME_RE}) to (\d+)\.$"), "change"),
    (re.compile(rf"^({NAME_RE}) is still (\d+)\.$"), "still"),
    (re.compile(rf"^drop ({NAME_RE})\.$"), "drop"),
)
_FACT_RE = re.compile(rf"^({NAME_RE}) = (\d+)$")


@dataclasses.dataclass(frozen=True)
class Fact:
    """One statement about a variable: `op` is "set", "change", "still" or "drop" (value None)."""

    key: str
    op: str
    value: int | None


def extract_facts(text: str) -> list[Fact]:
    """The facts stated by one utterance (zero or one for the ledger grammar)."""
    for pattern, op in _PATTERNS:
        m = pattern.match(text.strip())
        if m:
            return [Fact(m.group(1), op, int(m.group(2)) if op != "drop" else None)]
    return []


def fact_text(key: str, value: int) -> str:
    """How a store writes a kept fact: "kobu = 40"."""
    return f"{key} = {int(value)}"


def parse_fact_text(text: str) -> tuple[str, int] | None:
    """(key, value) of a kept fact's text, or None if `text` is not one."""
    m = _FACT_RE.match(text.strip())
    return (m.group(1), int(m.group(2))) if m else None
