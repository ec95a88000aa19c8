"""Connector counters, readable in-process and exported to Prometheus when asked."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ConnectorStats:
    lookups: Counter = field(default_factory=Counter)  # outcome/reason -> count
    counters: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def lookup(self, hit: bool, reason: str) -> None:
        with self._lock:
            self.lookups["hit" if hit else f"miss:{reason}"] += 1

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {**{f"lookup_{k}": v for k, v in self.lookups.items()}, **self.counters}
