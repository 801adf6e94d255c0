"""Messages from source threads into the app. The only thing a thread may do with the UI is post these."""

from __future__ import annotations

from textual.message import Message

from batchmon.snapshot import Snapshot


class SnapshotArrived(Message):
    """A new immutable Snapshot. A newer one pending in the queue replaces an older one (coalescing)."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        # Called as `current.can_replace(pending)`: True drops `current` for the pending newer snapshot.
        return isinstance(message, SnapshotArrived)


class PanelFocused(Message):
    """A panel gained or lost focus: panel sizes (levels) depend on what is selected."""
