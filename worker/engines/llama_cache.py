"""The prefix cache of the batching llama engine: finished sequences' cells, kept for reuse.

Each entry is a KV-cache sequence id of its own holding the cells of a finished sequence's
tokens (prompt + output), its token list, and its fingerprint chain (``shared.prefix``) as
advertised through ``WarmPrefixes``. A new sequence reuses the longest common token prefix of
any entry (``seq_cp``: in the unified cache the cells are shared, not copied) and prefills only
the rest. Entries are evicted least recently used first, when the cache holds more than its
share of the cells or a running sequence needs them.

Cell accounting is conservative: an entry counts all its tokens, even cells it shares with
another entry or a running sequence (a shared cell is freed only when its last holder goes).
Runs on the scheduler thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class Entry:
    sid: int  # the KV-cache sequence id holding the cells
    tokens: list[int]
    chain: list[str] = field(default_factory=list)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """LRU of cached token prefixes over a fixed pool of sequence ids."""

    def __init__(self, sids: range, budget_cells: int) -> None:
        self.free_sids = list(reversed(sids))
        self.budget = budget_cells
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # sid -> entry, LRU first

    @property
    def cells(self) -> int:
        return sum(len(e.tokens) for e in self.entries.values())

    def match(self, tokens: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest token prefix with ``tokens``, and its length."""
        best: Entry | None = None
        best_n = 0
        for entry in self.entries.values():
            n = common_prefix(entry.tokens, tokens)
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            self.entries.move_to_end(best.sid)
        return best, best_n

    def take_sid(self) -> int | None:
        return self.free_sids.pop() if self.free_sids else None

    def put(self, entry: Entry) -> None:
        self.entries[entry.sid] = entry

    def oldest(self) -> Entry | None:
        return next(iter(self.entries.values()), None)

    def remove(self, entry: Entry) -> None:
        if self.entries.pop(entry.sid, None) is not None:
            self.free_sids.append(entry.sid)
