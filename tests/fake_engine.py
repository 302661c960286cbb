"""A deterministic stand-in for codec.lm.engine.Engine with the same freqs/start/step interface.

Frequencies depend on the previous token only (a bigram table), so any batch layout and any mix of
parallel and incremental evaluation give identical rows by construction — a codec bug cannot hide
behind an engine bug. `train` fits the table to some text (add-one counts), so that text compresses
and the registry picks the LM container."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


class BigramEngine:
    def __init__(
        self,
        seed: int = 0,
        vocab_size: int = 259,
        bos_id: int = 256,
        max_seq_len: int = 256,
        train: bytes = b"",
    ):
        rng = np.random.default_rng(seed)
        table = rng.integers(1, 4, size=(vocab_size, vocab_size)).astype(np.int64)
        prev = bos_id
        for b in train:
            table[prev, b] += 200
            prev = b
        self.table = torch.from_numpy(table.astype(np.int32))
        self.vocab_size, self.bos_id, self.max_seq_len = vocab_size, bos_id, max_seq_len
        self.fingerprint = hashlib.blake2b(table.tobytes(), digest_size=16).digest()
        self.device = torch.device("cpu")

    def freqs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]  # (B, T, V)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.to(torch.float64).unsqueeze(-1)  # (B, T, 1): the token is the state

    def head(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.table[x[:, 0].long()]
        if out is None:
            return rows
        out.copy_(rows)
        return out

    def start(self, batch: int, max_len: int):
        return _State(np.zeros(batch, dtype=np.int64), max_len)

    def reset_rows(self, state, rows) -> None:
        state.pos[list(rows)] = 0

    def step(self, state, tokens: torch.Tensor) -> torch.Tensor:
        assert len(tokens) == len(state.pos)
        state.pos += 1
        assert state.pos.max() <= state.max_len
        return self.table[tokens]  # (B, V)


class _State:
    def __init__(self, pos: np.ndarray, max_len: int):
        self.pos, self.max_len = pos, max_len

    def rows(self, n: int) -> _State:
        return _State(self.pos[:n], self.max_len)  # a view, as engine.State.rows
