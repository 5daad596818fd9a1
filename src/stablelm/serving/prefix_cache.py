"""Reusing the keys and values of earlier sequences for requests that start with the same tokens.

A chat client resends the whole conversation every turn; on a CPU the prefill of that history is most of
the time to the first token. A finished sequence leaves its cache row here, keyed by its tokens; a new
request copies the longest matching prefix and prefills only the rest. The least recently used entries
go first once `max_bytes` is reached.
"""

from __future__ import annotations

from collections import OrderedDict

from ..models.cache import KVCache

MIN_TOKENS = 16  # shorter sequences are cheaper to prefill again than to keep


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self.bytes = 0
        self.lookups = self.hits = self.tokens_reused = 0

    @staticmethod
    def _size(entry: KVCache) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in entry.keys)

    def longest(self, ids: list[int]) -> tuple[int, KVCache | None]:
        """(tokens of `ids` whose keys/values an entry holds, that entry); at least one token is left to
        prefill, so the request still gets its next-token logits."""
        self.lookups += 1
        best, found = 0, None
        for tokens, entry in self.entries.items():
            n, limit = 0, min(len(tokens), len(ids) - 1)
            while n < limit and tokens[n] == ids[n]:
                n += 1
            if n > best:
                best, found = n, (tokens, entry)
        if found is None or best < MIN_TOKENS:
            return 0, None
        self.entries.move_to_end(found[0])
        self.hits += 1
        self.tokens_reused += best
        return best, found[1]

    def store(self, tokens: list[int], source: KVCache, row: int) -> None:
        """Keep row `row` of `source`, which holds the keys/values of `tokens`."""
        key = tuple(tokens)
        if len(key) < MIN_TOKENS or key in self.entries:
            return
        first = source.keys[0]
        entry = KVCache(len(source.keys), 1, first.shape[1], first.shape[3], len(key), dtype=first.dtype,
                        device=first.device)
        entry.copy_row(0, source, row)
        size = self._size(entry)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= self._size(old)
        self.entries[key] = entry
        self.bytes += size
