"""Named entries of one kind (fine-tuning methods, segmentation heads, detectors, pre-training adapters,
proposal methods), so that a new one is a single module that registers itself and the code that uses
them knows no name."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, setting: str):
        self.kind = kind  # what an entry is, for messages ("fine-tuning method")
        self.setting = setting  # the setting that names one ("method")
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry``; registering the same entry twice (a module imported again) is harmless, a
        different one under a taken name is refused."""
        if name in self._entries and self._entries[name] != entry:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"{self.setting} must be one of {self.names()}, got {name!r}") from None
