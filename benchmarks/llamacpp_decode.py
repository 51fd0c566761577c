"""llama.cpp as the CPU anchor for decoding speed: B sequences decoded together in one llama.cpp context.

Used by benchmarks/rollout.py where `llama_cpp` (llama-cpp-python) is importable. The model is rlhfkit's own
GGUF export of the same weights (export.write_gguf). Every sequence gets its own seq_id in one context: the
prompts are decoded in one llama_decode call, then each step decodes one token per sequence in one call, as
llama.cpp's server does with several slots. Sampling (temperature, no top-k/top-p) is done in numpy from each
sequence's logits, and EOS does not stop a row, so every row decodes exactly `new_tokens` tokens, as on the
torch sides.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


class LlamaCppDecoder:
    def __init__(self, gguf_file: Path, max_batch: int, max_len: int, threads: int):
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._utils import suppress_stdout_stderr

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max_batch * max_len
        params.n_batch = params.n_ubatch = max(max_batch * max_len, 512)
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = threads
        with suppress_stdout_stderr(disable=False):  # llama.cpp logs every buffer it allocates
            self.model = internals.LlamaModel(path_model=str(gguf_file),
                                              params=llama_cpp.llama_model_default_params(), verbose=False)
            self.ctx = internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.batch = internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=max_batch, verbose=False)
        self.n_vocab = self.model.n_vocab()

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.ctx.get_logits_ith(i)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def _sample(self, rows: list[int], rng: np.random.Generator, temperature: float) -> list[int]:
        out = []
        for i in rows:
            z = self._logits(i).astype(np.float64) / temperature
            p = np.exp(z - z.max())
            out.append(int(rng.choice(self.n_vocab, p=p / p.sum())))
        return out

    def generate(self, prompts: list[np.ndarray], new_tokens: int, temperature: float, seed: int) -> np.ndarray:
        """[B, new_tokens] sampled ids; the prompts prefill together, then one decode call per new token."""
        rng = np.random.default_rng(seed)
        self.ctx.kv_cache_clear()
        b = self.batch
        b.reset()
        last = []
        for s, ids in enumerate(prompts):
            b.add_sequence([int(t) for t in ids], s, False)
            last.append(b.n_tokens() - 1)
        self.ctx.decode(b)
        tokens = self._sample(last, rng, temperature)
        out = [tokens]
        for step in range(1, new_tokens):
            b.reset()
            for s, (ids, tok) in enumerate(zip(prompts, tokens)):
                j = s
                b.batch.token[j], b.batch.pos[j] = tok, len(ids) + step - 1
                b.batch.seq_id[j][0], b.batch.n_seq_id[j], b.batch.logits[j] = s, 1, True
            b.batch.n_tokens = len(prompts)
            self.ctx.decode(b)
            tokens = self._sample(list(range(len(prompts))), rng, temperature)
            out.append(tokens)
        return np.array(out).T
