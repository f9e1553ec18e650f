"""Label and field selectors: parsed once per request into matchers, as the API server does."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from . import names
from .status import bad_request

_KEY = r"[A-Za-z0-9./_-]+"
_EXISTS = re.compile(rf"^\s*(?P<negated>!?)\s*(?P<key>{_KEY})\s*$")
_EQUALITY = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>[^\s,]*)\s*$")
_SET = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")
_ORDER = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>[<>])\s*(?P<value>-?\d+)\s*$")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # exists, !exists, =, !=, in, notin, <, >
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "exists":
                return present
            case "!exists":
                return not present
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "<" | ">":
                if not present or not re.fullmatch(r"-?\d+", value):
                    return False
                bound = int(next(iter(self.values)))
                return int(value) < bound if self.operator == "<" else int(value) > bound
        raise AssertionError(self.operator)


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return all(r.matches(labels or {}) for r in self.requirements)


def _terms(text: str) -> list[str]:
    """Split on the commas outside parentheses: `a in (x,y),b` is two terms."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [term for term in terms if term.strip()]


def _requirement(term: str) -> Requirement:
    if m := _EXISTS.match(term):
        return Requirement(m["key"], "!exists" if m["negated"] else "exists")
    if m := _EQUALITY.match(term):
        operator = "!=" if m["op"] == "!=" else "="
        return Requirement(m["key"], operator, frozenset({m["value"]}))
    if m := _SET.match(term):
        values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
        return Requirement(m["key"], m["op"], values)
    if m := _ORDER.match(term):
        return Requirement(m["key"], m["op"], frozenset({m["value"]}))
    raise bad_request(f"unable to parse requirement: found '{term.strip()}', expected: a selector term")


def parse_label_selector(text: str | None) -> LabelSelector:
    requirements = []
    for term in _terms(text or ""):
        requirement = _requirement(term)
        problems = names.qualified_name(requirement.key)
        if requirement.operator not in ("<", ">"):
            problems += [p for v in requirement.values for p in names.label_value(v)]
        if problems:
            raise bad_request(f"unable to parse requirement: {term.strip()}: {'; '.join(problems)}")
        requirements.append(requirement)
    return LabelSelector(tuple(requirements))


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[tuple[str, bool, str], ...] = ()  # (field path, equal?, value)

    def matches(self, obj: Mapping) -> bool:
        return all((_field_value(obj, path) == value) == equal for path, equal, value in self.terms)


def _field_value(obj: Mapping, path: str) -> str:
    node = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return "" if node is None else str(node)


def parse_field_selector(text: str | None, known: frozenset[str]) -> FieldSelector:
    terms = []
    for term in _terms(text or ""):
        m = _EQUALITY.match(term)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{term.strip()}'")
        if m["key"] not in known:
            listed = ", ".join(f'"{k}"' for k in sorted(known))
            raise bad_request(f'"{m["key"]}" is not a known field selector: only {listed}')
        terms.append((m["key"], m["op"] != "!=", m["value"]))
    return FieldSelector(tuple(terms))

