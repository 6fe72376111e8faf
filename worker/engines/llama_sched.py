"""The batching scheduler: one thread, one llama.cpp context, every running sequence per step.

Each step builds one batch: a decode row for every sequence that has a token to feed, then
prompt rows (chunked prefill) of sequences still reading their prompt, up to ``MAX_ROWS``
rows. So a long prompt is read a chunk per step while the others keep decoding, and a new
sequence starts without waiting for the batch to drain. A finished or cancelled sequence
frees its sequence id and reservation at once; its cells move into the prefix cache
(``llama_cache``) for the next request that shares its prefix.

Determinism (measured on llama.cpp's CPU kernels, see docs/reliability.md): a row's logits
are bitwise independent of the other rows in its batch only when the batch's row count is a
multiple of ``ROW_ALIGN`` and below 64. Every batch is padded to a multiple of ``ROW_ALIGN``
with rows of a scratch sequence (removed right after the decode) and never exceeds
``MAX_ROWS``. And every sequence's cells must lie in position order (flash attention sums a
query's cells in cell order): once cells were freed, the next step first lays every live
sequence out again (``_compact``). Then greedy output is the same alone or in any batch, warm
or cold, and a continuation that prefills the delivered tokens equals the uninterrupted run.
"""

from __future__ import annotations

import codecs
import hashlib
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.prefix import block_hashes
from worker.engine import EngineError, GenerationStats
from worker.engines.llama_cache import Entry, PrefixCache
from worker.engines.llama_ctx import LlamaContext
from worker.engines.llama_sampling import Sampler, SamplingSpec

ROW_ALIGN = 8
MAX_ROWS = 56
MIN_CACHED = 1  # every ended sequence's cells go to the cache (freeing cells costs a compaction)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one generation evaluates and how it samples (built on the event loop's side)."""

    prompt: list[int]
    produced: list[int]  # delivered tokens (failover): prefilled after the prompt
    remaining: int
    stops: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int | None
    text: str  # the rendered prompt text (fingerprinted for the warm advertisement)
    skip: int = 0  # sampling draws already spent (tokens delivered before a failover)
    spec: SamplingSpec | None = None  # the job's features (top_k, penalties, grammar, ...)


@dataclass(frozen=True, slots=True)
class Piece:
    """One token's text, as it crosses from the scheduler thread to the event loop."""

    text: str
    last: bool = False


Emit = Callable[["Piece | EngineError | None"], None]


@dataclass(eq=False, slots=True)
class Seq:
    plan: Plan
    emit: Emit
    stats: GenerationStats
    inputs: list[int] = field(default_factory=list)  # prompt + produced
    sid: int = -1
    fed: int = 0  # tokens of inputs + out evaluated (cells held)
    out: list[int] = field(default_factory=list)  # sampled tokens
    reserved: int = 0
    shared_from: Entry | None = None
    shared: int = 0
    cancelled: bool = False
    text: list[str] = field(default_factory=list)
    sampler: Sampler | None = None
    digest: Any = None  # hash of every logits row (when the scheduler traces)
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.inputs)

    def evaluated(self) -> list[int]:
        return (self.inputs + self.out)[: self.fed]


WarmHook = Callable[[list[str], bool], None]  # (fingerprint chain, held?) -> None


class Scheduler:
    """Owns the context; ``submit`` from any thread, everything else on its own thread."""

    def __init__(
        self, ctx: LlamaContext, max_seqs: int, cache: PrefixCache, warm: WarmHook
    ) -> None:
        self.ctx = ctx
        self.max_seqs = max_seqs
        self.cache = cache
        self.warm = warm
        self.scratch = ctx.shape.n_seq_max - 1
        self.inbox: queue.SimpleQueue[Seq | None] = queue.SimpleQueue()
        self.pending: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.free_sids = list(reversed(range(max_seqs)))
        self.reserved = 0  # cells reserved by running sequences (beyond shared prefixes)
        self.waiting = 0  # submitted, not yet admitted (read by has_room on the loop)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="llama-scheduler", daemon=True)
        self.stopping = False
        self.steps = 0
        self.dirty = False  # cells were freed: lay the live sequences out again before a decode
        self.trace: list[tuple[str, str]] | None = None  # tests: (prompt text, logits digest)
        self.compactions = 0
        self.clear_requested = threading.Event()
        self.cleared = threading.Event()

    # --- any thread -----------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, seq: Seq) -> None:
        with self.lock:
            self.waiting += 1
        self.inbox.put(seq)

    def _admitted(self) -> None:
        with self.lock:
            self.waiting -= 1

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(None)

    def free_cells(self) -> int:
        """Cells neither reserved by running sequences nor needed for padding."""
        return self.ctx.shape.n_ctx - ROW_ALIGN - self.reserved

    def slots_free(self) -> int:
        return len(self.free_sids) - self.waiting

    # --- the scheduler thread -------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping:
            self._collect(block=not self.running)
            self._drop_cancelled()
            if self.clear_requested.is_set() and not self.running:
                self._clear()
            if not self.running:
                self._trim()
            self._admit()
            if self.running:
                try:
                    if self.dirty:
                        self._compact()
                    self._step()
                except Exception as exc:  # a failed decode ends every sequence in the batch
                    self._fail_all(exc)
        for seq in [*self.running, *self.pending]:
            seq.emit(EngineError("llama engine closed", code="engine_unavailable", status=503))

    def _clear(self) -> None:
        """Drop every cached prefix and reset the cache's layout (idle only)."""
        for entry in list(self.cache.entries.values()):
            self._drop_entry(entry)
        self.ctx.clear_cache()
        self.dirty = False
        self.clear_requested.clear()
        self.cleared.set()

    def _collect(self, *, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if item is not None:
                    self.pending.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self._release(seq, keep=True)
        for seq in [s for s in self.pending if s.cancelled]:
            self.pending.remove(seq)
            self._admitted()

    def _admit(self) -> None:
        """Start pending sequences in order while a sequence id and the cells are free."""
        while self.pending and self.free_sids:
            seq = self.pending[0]
            entry, shared = self.cache.match(seq.inputs)
            shared = min(shared, len(seq.inputs) - 1)  # evaluate >= 1 token: its logits
            keep = entry if shared > 0 else None
            need = len(seq.inputs) - shared + seq.plan.remaining
            if not self._make_room(need, keep):
                if keep is None or self.running:
                    return  # the head waits for cells (running sequences will free them)
                self._drop_entry(keep)  # alone and still short: give up the reuse
                continue
            self.pending.popleft()
            self._admitted()
            self._start(seq, keep, shared if keep else 0, need)

    def _make_room(self, need: int, keep: Entry | None) -> bool:
        """Evict cached prefixes (least recently used first) until ``need`` cells are free."""
        while self.free_cells() - self.cache.cells < need:
            victim = next((e for e in self.cache.entries.values() if e is not keep), None)
            if victim is None:
                return False
            self._drop_entry(victim)
        return True

    def _drop_entry(self, entry: Entry) -> None:
        """Evict a cached prefix: its id goes, its cells go unless a running sequence holds
        them (they become that sequence's own)."""
        for seq in self.running:
            if seq.shared_from is entry:
                self._own_shared(seq)
        self.ctx.seq_rm(entry.sid)
        self.dirty = True
        self.cache.remove(entry)
        if entry.chain:
            self.warm(entry.chain, False)

    def _start(self, seq: Seq, entry: Entry | None, shared: int, need: int) -> None:
        seq.sid = self.free_sids.pop()
        self.ctx.seq_rm(seq.sid)
        if entry is not None:
            self.ctx.seq_cp(entry.sid, seq.sid, 0, shared)
            seq.shared_from, seq.shared = entry, shared
        seq.fed = shared
        seq.reserved = need
        self.reserved += need
        seq.stats.cached_tokens = min(shared, len(seq.plan.prompt))
        seq.stats.prompt_tokens = len(seq.plan.prompt)
        plan = seq.plan
        seq.sampler = Sampler(
            plan.temperature,
            plan.top_p,
            plan.seed,
            plan.skip,
            plan.spec,
            prompt=plan.prompt,
            produced=plan.produced,
        )
        seq.digest = hashlib.blake2b(digest_size=16) if self.trace is not None else None
        self.running.append(seq)

    # --- one step -------------------------------------------------------------------------
    def _step(self) -> None:
        ctx = self.ctx
        ctx.clear()
        rows: list[tuple[Seq, int]] = []
        for seq in self.running:  # decode rows first: running sequences never wait
            if not seq.prefilling:
                token = seq.out[-1]
                rows.append((seq, ctx.add(token, seq.fed, seq.sid, logits=True)))
        for seq in self.running:  # then prompt chunks, oldest first, in what rows are left
            if seq.prefilling and ctx.rows < MAX_ROWS:
                row = self._prefill_chunk(seq)
                if row is not None:
                    rows.append((seq, row))
        self._pad()
        ctx.decode()
        ctx.seq_rm(self.scratch)
        self.steps += 1
        for seq, row in rows:
            self._advance(seq, row)

    def _prefill_chunk(self, seq: Seq) -> int | None:
        ctx = self.ctx
        end = min(len(seq.inputs), seq.fed + MAX_ROWS - ctx.rows)
        row = None
        for pos in range(seq.fed, end):
            last = pos == len(seq.inputs) - 1
            r = ctx.add(seq.inputs[pos], pos, seq.sid, logits=last)
            row = r if last else None
        seq.fed = end
        return row

    def _pad(self) -> None:
        for pos in range(-self.ctx.rows % ROW_ALIGN):
            self.ctx.add(0, pos, self.scratch, logits=False)

    def _advance(self, seq: Seq, row: int) -> None:
        """A sequence's row gave logits: sample, deliver, and finish if it is done."""
        if seq.out:
            seq.fed += 1  # the token fed this step now holds a cell
        assert seq.sampler is not None
        logits = self.ctx.logits(row)
        if seq.digest is not None:
            seq.digest.update(logits.tobytes())
        token = seq.sampler(logits)
        spec = seq.plan.spec
        if self.ctx.model.is_eog(token) and not (spec is not None and spec.ignore_eos):
            self._finish(seq, "")
            return
        seq.out.append(token)
        last = len(seq.out) >= seq.plan.remaining
        text = seq.decoder.decode(self.ctx.model.piece(token), final=last)
        seq.text.append(text)
        if last:
            self._finish(seq, text, final=True)
        else:
            seq.emit(Piece(text))

    def _finish(self, seq: Seq, text: str, *, final: bool = False) -> None:
        if not final:
            text = seq.decoder.decode(b"", final=True)
            seq.text.append(text)
        if text or final:
            seq.emit(Piece(text, True))
        seq.emit(None)
        self._release(seq, keep=True)

    def _release(self, seq: Seq, *, keep: bool) -> None:
        """Free a sequence's id and cells; a finished one's cells go to the prefix cache."""
        self.running.remove(seq)
        self.reserved -= seq.reserved
        if seq.digest is not None and self.trace is not None:
            self.trace.append((seq.plan.text, seq.digest.hexdigest()))
        tokens = seq.evaluated()
        sid = self._cache_sid() if keep and len(tokens) >= MIN_CACHED else None
        if sid is not None:
            self.ctx.seq_rm(sid)
            self.ctx.seq_cp(seq.sid, sid, -1, -1)
            self._cache(Entry(sid, tokens), seq)
        else:
            self.dirty = True  # its cells are freed, not kept
        self.ctx.seq_rm(seq.sid)
        self.free_sids.append(seq.sid)

    def _cache_sid(self) -> int | None:
        sid = self.cache.take_sid()
        if sid is None and (oldest := self.cache.oldest()) is not None:
            self._drop_entry(oldest)
            sid = self.cache.take_sid()
        return sid

    def _cache(self, entry: Entry, seq: Seq) -> None:
        output = "".join(seq.text)
        cuts = [i for i in (output.find(s) for s in seq.plan.stops if s) if i >= 0]
        entry.chain = block_hashes(seq.plan.text + (output[: min(cuts)] if cuts else output))
        self.cache.put(entry)
        if entry.chain:
            self.warm(entry.chain, True)

    def _compact(self) -> None:
        """Lay every live sequence out again: contiguous, in position order, free cells last.

        llama.cpp puts a new token in the first free cell it finds from a head that moves back
        to any cell freed below it. After an eviction, a sequence's next token (or a new
        sequence's, after a cached prefix higher up) can land below its earlier cells; flash
        attention then sums that query's cells in another order: other last bits, and
        sometimes, tokens later, another greedy token (docs/reliability.md). So before the
        next decode every live sequence (running ones and cached prefixes) is saved bit for
        bit (``llama_state_seq_get_data``), the cache cleared, and each restored into one
        contiguous run: no cell is free below a live one, and new tokens go after all of
        them. Cells shared through ``seq_cp`` come back once per holder, as the accounting
        already counts them (a running sequence's shared prefix becomes its own; cached
        prefixes are evicted first if that needs room). The cost is a copy of the live cells
        (~18 KB each for Gemma 3 270M), paid only after an eviction.
        """
        while self.free_cells() - self.cache.cells < self._shared_cells() and self.cache.entries:
            victim = self.cache.oldest()
            assert victim is not None
            self._drop_entry(victim)
        live = [s.sid for s in self.running if s.fed > 0] + list(self.cache.entries)
        states = [(sid, self.ctx.save_seq(sid)) for sid in live]
        self.ctx.clear_cache()
        for sid, state in states:
            self.ctx.restore_seq(sid, state)
        for seq in self.running:
            if seq.shared_from is not None:
                self._own_shared(seq)
        self.dirty = False
        self.compactions += 1

    def _shared_cells(self) -> int:
        return sum(s.shared for s in self.running if s.shared_from is not None)

    def _own_shared(self, seq: Seq) -> None:
        """The cells a sequence shares with a cached prefix become its own (reserved)."""
        self.reserved += seq.shared
        seq.reserved += seq.shared
        seq.shared_from = None

    def _trim(self) -> None:
        """Idle: evict cached prefixes (LRU) down to the cache's share of the cells. While busy
        the cache may use any cell no sequence reserved and gives cells back only when a new
        sequence needs them: every eviction costs a compaction before the next decode."""
        while self.cache.entries and self.cache.cells > self.cache.budget:
            victim = self.cache.oldest()
            assert victim is not None
            self._drop_entry(victim)

    def _fail_all(self, exc: Exception) -> None:
        error = EngineError(f"llama.cpp generation failed: {exc}", code="engine_error")
        for seq in list(self.running):
            seq.emit(error)
            self._release(seq, keep=False)
