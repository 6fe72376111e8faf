"""A thin, typed face of llama.cpp's low-level API: one model, one context, one batch.

Everything here blocks and runs on the engine's scheduler thread only (llama.cpp contexts are
not thread-safe); tokenizing reads the vocabulary only and may run on any thread.

The context is built for batching many sequences: a unified KV cache (``kv_unified``: every
sequence's cells live in one buffer, so ``seq_cp`` shares cells instead of copying them),
full-size sliding-window layers (``swa_full``: Gemma 3's local-attention layers keep every
cell, so a cached prefix stays usable), and flash attention (its CPU kernel walks a query's
own cells in order and skips masked ones, so what else is in the cache does not enter the
sums; see docs/reliability.md, "Determinism of the llama engine").
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Logits = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ContextShape:
    """What the context is sized for."""

    n_ctx: int  # KV cells shared by every sequence
    n_seq_max: int  # sequence ids: running sequences + cached prefixes
    n_batch: int  # most tokens one llama_decode call takes
    threads: int


class LlamaModel:
    """A loaded GGUF model: vocabulary, tokenizer and metadata."""

    def __init__(self, path: str) -> None:
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(False)  # llama.cpp's load chatter: errors only
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise ValueError(f"llama.cpp could not load {path}")
        self.lib: Any = llama_cpp
        self.ptr: Any = model
        self.vocab: Any = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    def close(self) -> None:
        if self.ptr:
            self.lib.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
        size = len(text) + 8
        buf = (ctypes.c_int32 * size)()
        n = self.lib.llama_tokenize(self.vocab, text, len(text), buf, size, add_bos, special)
        if n < 0:
            size = -n
            buf = (ctypes.c_int32 * size)()
            n = self.lib.llama_tokenize(self.vocab, text, len(text), buf, size, add_bos, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render empty, as llama.cpp's detokenizer)."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return bytes(buf.raw[:n])

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def token_bos(self) -> int:
        return int(self.lib.llama_vocab_bos(self.vocab))

    def token_eos(self) -> int:
        return int(self.lib.llama_vocab_eos(self.vocab))

    def token_text(self, token: int) -> str:
        raw = self.lib.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")


class LlamaContext:
    """One llama.cpp context with a unified KV cache, and its reusable batch."""

    def __init__(self, model: LlamaModel, shape: ContextShape) -> None:
        lib = model.lib
        params = lib.llama_context_default_params()
        params.n_ctx = shape.n_ctx
        params.n_batch = shape.n_batch
        params.n_ubatch = shape.n_batch
        params.n_seq_max = shape.n_seq_max
        params.n_threads = shape.threads
        params.n_threads_batch = shape.threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.kv_unified = True
        params.swa_full = True
        params.no_perf = True
        ctx = lib.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise ValueError("llama.cpp could not create a context")
        self.lib: Any = lib
        self.model = model
        self.shape = shape
        self.ptr: Any = ctx
        self.mem: Any = lib.llama_get_memory(ctx)
        self.batch: Any = lib.llama_batch_init(shape.n_batch, 0, 1)
        self.rows = 0

    def close(self) -> None:
        if self.ptr:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ptr)
            self.ptr = None

    # --- the batch ------------------------------------------------------------------------
    def clear(self) -> None:
        self.rows = 0

    def room(self) -> int:
        return self.shape.n_batch - self.rows

    def add(self, token: int, pos: int, seq: int, *, logits: bool) -> int:
        """Append one token; returns its row (the index of its logits after ``decode``)."""
        b, i = self.batch, self.rows
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = 1 if logits else 0
        self.rows += 1
        return i

    def decode(self) -> None:
        """Evaluate the batch (raises on failure: no cells free, or llama.cpp's error)."""
        self.batch.n_tokens = self.rows
        rc = self.lib.llama_decode(self.ptr, self.batch)
        self.rows = 0
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, row: int) -> Logits:
        """A row's logits, read in place: valid until the next ``decode`` (no 1 MB copy per
        row for Gemma's 262k vocabulary; samplers that adjust logits work on a copy)."""
        ptr = self.lib.llama_get_logits_ith(self.ptr, row)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    # --- the KV cache ---------------------------------------------------------------------
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        return int(self.lib.llama_memory_seq_pos_max(self.mem, seq))

    def clear_cache(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)

    def save_seq(self, seq: int) -> Any:
        """A sequence's cells, bit for bit: positions and K/V of every layer (both caches)."""
        size = int(self.lib.llama_state_seq_get_size(self.ptr, seq))
        state = (ctypes.c_uint8 * size)()
        if self.lib.llama_state_seq_get_data(self.ptr, state, size, seq) != size:
            raise RuntimeError(f"llama.cpp could not save sequence {seq}")
        return state

    def restore_seq(self, seq: int, state: Any) -> None:
        """Put saved cells back under ``seq``, in one contiguous run of free cells."""
        if self.lib.llama_state_seq_set_data(self.ptr, state, len(state), seq) != len(state):
            raise RuntimeError(f"llama.cpp found no room to restore sequence {seq}")
