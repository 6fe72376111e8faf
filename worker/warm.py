"""``WarmPrefixes``: what an engine holds warm, as prefix fingerprints (``shared.prefix``).

An LRU of cached prompts, each kept as its chain of block hashes. The engine calls ``add``
when a sequence's prefix stays in its cache (prompt + output, for the next turn) and
``discard`` when it evicts one; it may ask ``match`` how many leading blocks of a new prompt
it holds. The worker advertises ``blocks()`` (every block hash of every entry) in Redis, where
the pull script binary-searches it, so an entry counts whole: adding one evicts the least
recently used entries until at most ``max_blocks`` distinct blocks remain (the bound on the
advertisement's size). ``version`` grows on every change, so the worker re-advertises only
what changed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict


class WarmPrefixes:
    """LRU of block-hash chains with a bound on distinct blocks."""

    def __init__(self, max_blocks: int = 4096) -> None:
        self.max_blocks = max_blocks
        self.entries: OrderedDict[str, list[str]] = OrderedDict()  # tip hash -> chain
        self.refs: Counter[str] = Counter()  # block hash -> entries holding it
        self.version = 0

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, chain: list[str], *, touch: bool = True) -> int:
        """Leading blocks of ``chain`` held warm (the longest cached prefix, in blocks)."""
        lo, hi = 0, len(chain)
        while lo < hi:  # holding block i implies holding every block before it
            mid = (lo + hi + 1) // 2
            if self.refs[chain[mid - 1]] > 0:
                lo = mid
            else:
                hi = mid - 1
        if touch and lo:
            self._touch(chain[:lo])
        return lo

    def add(self, chain: list[str]) -> list[list[str]]:
        """Hold ``chain`` (most recent); returns the entries evicted to stay within bounds."""
        if not chain:
            return []
        tip = chain[-1]
        if tip in self.entries:
            self.entries.move_to_end(tip)
            return []
        self.entries[tip] = list(chain)
        self.refs.update(chain)
        self.version += 1
        evicted: list[list[str]] = []
        while len(self.refs) > self.max_blocks and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self._unref(old)
            evicted.append(old)
        return evicted

    def discard(self, chain: list[str]) -> None:
        """Forget the entry ending at ``chain``'s last block (the engine evicted it)."""
        if chain and (old := self.entries.pop(chain[-1], None)) is not None:
            self._unref(old)
            self.version += 1

    def blocks(self) -> set[str]:
        """Every block hash held: the advertisement."""
        return set(self.refs)

    def _touch(self, prefix: list[str]) -> None:
        for tip, chain in reversed(self.entries.items()):
            if len(chain) >= len(prefix) and chain[len(prefix) - 1] == prefix[-1]:
                self.entries.move_to_end(tip)
                return

    def _unref(self, chain: list[str]) -> None:
        for h in chain:
            self.refs[h] -= 1
            if self.refs[h] <= 0:
                del self.refs[h]
