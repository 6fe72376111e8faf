"""Prefix fingerprints: chained hashes over fixed-size blocks of a rendered prompt.

The gateway fingerprints every job's rendered prompt (``shared.prompt.render_transcript``);
workers advertise the fingerprints of what their engines hold warm. Block ``i``'s hash covers
blocks ``0..i`` (each hash is seeded with the one before), so two prompts share their first
``n`` block hashes exactly when they share their first ``n`` blocks: the longest common prefix
is the longest common run of leading hashes, and "holds block ``i``" implies "holds every
block before it" (what lets the pull script binary-search a worker's advertisement).

Blocks are UTF-8 bytes, not tokens: the gateway has no tokenizer, and a fingerprint must be the
same on every gateway replica and every worker. Only whole blocks are hashed; the partial tail
is not (it may still be growing into the next turn). The engine's own reuse is exact (tokens);
the fingerprint only decides where a job should go.
"""

from __future__ import annotations

import hashlib

BLOCK_BYTES = 256
"""Bytes of UTF-8 per block (about 64 tokens of English; 1.4 µs of hashing each)."""

MAX_BLOCKS = 128
"""Longest fingerprint kept (32 KiB of prompt): what a job stores, bounded."""


def block_hashes(
    text: str, *, limit: int = MAX_BLOCKS, block_bytes: int = BLOCK_BYTES
) -> list[str]:
    """The chain of 64-bit hashes (hex) of ``text``'s whole leading blocks, at most ``limit``."""
    data = text.encode("utf-8", errors="surrogatepass")
    end = min(len(data) // block_bytes, limit) * block_bytes
    out: list[str] = []
    prev = b""
    for i in range(0, end, block_bytes):
        prev = hashlib.blake2b(prev + data[i : i + block_bytes], digest_size=8).digest()
        out.append(prev.hex())
    return out
