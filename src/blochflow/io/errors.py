"""The one error type for bad user input: a message naming file, item and problem."""

from __future__ import annotations


class InputError(Exception):
    """Malformed or inconsistent input. ``str(err)`` is a complete one-line message."""

    def __init__(self, path: object, item: str, problem: str):
        self.path = str(path)
        self.item = item
        self.problem = problem
        super().__init__(f"{self.path}: {item}: {problem}")
