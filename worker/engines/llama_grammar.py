"""``response_format`` for the llama engine: a JSON schema as a llama.cpp grammar sampler.

The schema becomes GBNF with llama-cpp-python's converter (``json_schema_to_gbnf``; a
``json_object`` request gets its generic JSON grammar), and llama.cpp's grammar sampler
(``llama_sampler_init_grammar``) masks one row of logits at a time: tokens the grammar cannot
accept next get -inf. The state advances with every accepted token, so a failover
continuation feeds the delivered tokens through ``accept`` first: the grammar works on text,
so any tokenization of the delivered text leaves it in the same state.

Masking the whole vocabulary (262k tokens for Gemma 3) costs milliseconds a token, so the
sampler first checks only the token it would pick anyway (``allows``) and masks the whole row
only when the grammar refuses it (llama.cpp's common sampler does the same).
"""

from __future__ import annotations

import ctypes
import json
import weakref
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def gbnf_for(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema (``{"type": "object"}`` with nothing else: any JSON object)."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if schema == {"type": "object"} or not schema:
        return str(JSON_GBNF)  # its root is an object
    return str(json_schema_to_gbnf(json.dumps(schema)))


class Grammar:
    """One sequence's grammar state (a llama.cpp sampler, freed with this object)."""

    def __init__(self, vocab: Any, gbnf: str) -> None:
        handle = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not handle:
            raise ValueError("llama.cpp could not parse the grammar for this response_format")
        self.handle = handle
        self._free = weakref.finalize(self, llama_cpp.llama_sampler_free, handle)

    def _apply(self, ids: npt.NDArray[np.int32], logits: npt.NDArray[np.float32]) -> np.ndarray:
        data = np.empty(len(ids), dtype=TOKEN_DATA)
        data["id"], data["logit"], data["p"] = ids, logits, 0.0
        ptr = data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        arr = llama_cpp.llama_token_data_array(data=ptr, size=len(ids), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.handle, ctypes.byref(arr))
        return data

    def allows(self, token: int) -> bool:
        data = self._apply(np.array([token], np.int32), np.zeros(1, np.float32))
        return bool(np.isfinite(data["logit"][0]))

    def mask(self, logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``logits`` with every token the grammar refuses now set to -inf."""
        ids = np.arange(len(logits), dtype=np.int32)
        data = self._apply(ids, np.zeros(len(logits), np.float32))
        out = logits.copy()
        out[~np.isfinite(data["logit"])] = -np.inf
        return out

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.handle, token)
