"""Declared bounds of config fields: one small rule language shared by the attention mechanisms'
options (attention/registry.py, a class's OPTION_RULES) and the trainer's and families' fields
(trainer/config.py BASE_RULES, a Task's FIELD_RULES), so that every field's allowed values are
written once, next to its default, and checked before anything is built.

A rule is one of
  a string of terms joined by " or ", each a comparison (">= 1", "> 0", "== -1", "<= 1") or an
      interval ("[0, 1]", "[0, 1)", "(0, 1]", "(0, 1)"): numbers; a tuple or list value has
      every element checked;
  a tuple of allowed values: ("auto", "xla", "pallas"); a tuple value: each of its elements.
`check(field, value, rule)` raises ValueError "config.<field>=<value>: must be >= 1" (or
"allowed: ...").
"""
from __future__ import annotations

import operator
from typing import Any, Mapping

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt,
        "<": operator.lt}


def _term(term: str, value) -> bool:
    term = term.strip()
    for op in (">=", "<=", "==", ">", "<"):  # two-character operators first
        if term.startswith(op):
            return _OPS[op](value, float(term[len(op):]))
    if term[:1] in "[(" and term[-1:] in "])":
        lo, hi = (float(x) for x in term[1:-1].split(","))
        return ((lo <= value) if term[0] == "[" else (lo < value)) and (
            (value <= hi) if term[-1] == "]" else (value < hi))
    raise ValueError(f"bad field rule term {term!r}")


def ok(value, rule) -> bool:
    """Whether `value` satisfies `rule` (see the module docstring)."""
    if isinstance(rule, (tuple, list)):
        if isinstance(value, (tuple, list)) and not any(isinstance(r, (tuple, list)) for r in rule):
            return all(v in rule for v in value)  # a tuple of choices, e.g. LoRA's targets
        return value in rule
    if isinstance(value, (tuple, list)):
        return all(ok(v, rule) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return any(_term(t, value) for t in rule.split(" or "))


def describe(rule) -> str:
    if isinstance(rule, (tuple, list)):
        return "allowed: " + ", ".join(map(repr, rule))
    return "must be " + rule


def check(field: str, value, rule) -> None:
    """Raises ValueError naming config.<field>, its value and what the rule allows."""
    if not ok(value, rule):
        each = " (each element)" if isinstance(value, (tuple, list)) else ""
        raise ValueError(f"config.{field}={value!r}: {describe(rule)}{each}")


def _get(config, field: str) -> Any:
    node = config
    for part in field.split("."):
        keys = node.keys() if hasattr(node, "keys") else ()
        if part not in keys:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_all(config, rules: Mapping[str, Any], prefix: str = "") -> None:
    """check() for every field of `rules` ("group.name": rule) that `config` holds; fields it
    does not hold are skipped (a variant without them). prefix: prepended to the names in the
    message (e.g. "model." when `config` is config.model)."""
    for field, rule in rules.items():
        value = _get(config, field)
        if value is not _MISSING:
            check(prefix + field, value, rule)
