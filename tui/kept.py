"""What a panel's line (or block of lines) was made from, and the line: made again only when its inputs change.

Why: the panels are built again whenever anything they show changes, and beside fast training jobs something
always does (a step counter, a GPU's watts): the GPU panel and the focused job's full panel were rebuilt every
second, ~40 lines of Rich Text each, for the one or two lines that read differently. Kept, the lines that did not
change are the same Text objects as the second before: no formatting, no styles, and the panel's line diff
(LinesPanel.update_if_changed) finds them equal by identity.

The kept values are shared: whoever takes one must not change it (append to a copy, or make a new Text around
it). LinesPanel's clean-up and no-wrap settings are the same on every pass, so a kept line may go through them
again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class Kept(Generic[V]):
    """A bounded map from a line's inputs (any hashable key) to what was made from them, the latest used kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._made: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """``make()``, or what it returned for an equal key while that is still kept."""
        made = self._made
        found = made.get(key, _MISSING)
        if found is _MISSING:
            found = made[key] = make()
            if len(made) > self.limit:
                made.popitem(last=False)
        else:
            made.move_to_end(key)
        return found  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._made)

    def clear(self) -> None:
        self._made.clear()


_MISSING = object()
