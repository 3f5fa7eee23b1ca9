"""A one-item mailbox that keeps only the newest item and counts what it replaced."""

from __future__ import annotations

import threading
from typing import Any


class LatestSlot:
    """Hold at most one item; a newer ``put`` replaces (and counts as dropped) the older."""

    def __init__(self):
        self._lock = threading.Lock()
        self._item: Any = None
        self._full = False
        self.received = 0
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Store ``item``; return True if it replaced one that was never taken."""
        with self._lock:
            replaced = self._full
            self._item, self._full = item, True
            self.received += 1
            self.dropped += int(replaced)
            return replaced

    def take(self) -> tuple[bool, Any]:
        """Return ``(True, item)`` and empty the slot, or ``(False, None)`` if it is empty."""
        with self._lock:
            if not self._full:
                return False, None
            item, self._item, self._full = self._item, None, False
            return True, item

    def __bool__(self) -> bool:
        with self._lock:
            return self._full
