"""Counting calls of real functions and constructors during a test (a spy, not a mock: the
wrapped function runs unchanged)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


def count_calls(monkeypatch, owner, name: str, key: Callable, seen: Counter) -> None:
    """Wrap ``owner.name`` (a function or classmethod) so each call adds ``key(*args)`` to
    ``seen``, then runs the real one; ``monkeypatch`` puts it back after the test."""
    raw = owner.__dict__[name]
    is_classmethod = isinstance(raw, classmethod)
    real = raw.__func__ if is_classmethod else raw

    def counted(*args, **kwargs):
        seen[key(*args, **kwargs)] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, classmethod(counted) if is_classmethod else counted)
