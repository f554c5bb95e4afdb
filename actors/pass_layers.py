"""When a streamed layer may be released: after the last part of the pass is done with it.

One target pass may verify several batches, each as one or more micro-batches ("parts"),
all served by the same copy of each layer. A layer's slot may only be refilled once every
part of the pass has run that layer, whichever batch finishes it last.
"""

from __future__ import annotations

from collections import Counter


class PassLayers:
    def __init__(self):
        self.parts = 0
        self.done: Counter = Counter()

    def begin(self, parts: int):
        if parts < 1:
            raise ValueError(f"a pass has at least one part, got {parts}")
        # Counts left over can only come from a pass that failed midway; start clean.
        self.done.clear()
        self.parts = parts

    def finished(self, layer: int) -> bool:
        """One part is done with `layer`; True when it was the last one (release it now)."""
        self.done[layer] += 1
        if self.done[layer] < self.parts:
            return False
        del self.done[layer]
        return True
