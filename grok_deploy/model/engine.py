"""The decoder engine protocol (in-flight batching) and `TorchEngine`, the reference model behind it.

An engine keeps one KV cache slot per live sequence:
- `add(seq_id, prompt_ids)` prefills a new sequence and returns the logits of its last position;
- `step(seq_ids, last_tokens)` appends one token to each listed sequence (each at its own
  position) and returns the logits of that position, one row per sequence, in the order given;
- `remove(seq_id)` frees its slot.
`engine_generate` runs the reference's `generate` semantics (same sampling, same generator) on
any engine, so the ONNX Runtime engine and this one are checked against `generate.generate`.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class EngineError(ValueError):
    """A request the engine cannot take: unknown or duplicate id, no free slot, too long."""


class DecoderEngine(Protocol):
    max_batch_size: int
    max_seq_len: int
    vocab_size: int

    def add(self, seq_id, prompt_ids: Sequence[int]) -> np.ndarray: ...          # (V,) f32
    def step(self, seq_ids: Sequence, last_tokens: Sequence[int]) -> np.ndarray: ...  # (B, V) f32
    def remove(self, seq_id) -> None: ...


class SlotTable:
    """Sequence id -> (slot, length) bookkeeping shared by the engines."""

    def __init__(self, max_batch_size: int, max_seq_len: int):
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.slot: dict = {}
        self.length: dict = {}

    def new(self, seq_id, n_tokens: int) -> int:
        if seq_id in self.slot:
            raise EngineError(f"sequence {seq_id!r} is already live; remove it first")
        if n_tokens == 0:
            raise EngineError(f"sequence {seq_id!r}: the prompt is empty")
        if n_tokens >= self.max_seq_len:
            raise EngineError(f"sequence {seq_id!r}: prompt of {n_tokens} tokens leaves no room "
                              f"(max_seq_len {self.max_seq_len})")
        free = sorted(set(range(self.max_batch_size)) - set(self.slot.values()))
        if not free:
            raise EngineError(f"all {self.max_batch_size} slots are busy; remove a sequence first")
        self.slot[seq_id], self.length[seq_id] = free[0], n_tokens
        return free[0]

    def check_step(self, seq_ids: Sequence) -> None:
        if len(set(seq_ids)) != len(seq_ids):
            raise EngineError(f"step: duplicate sequence ids in {list(seq_ids)}")
        for s in seq_ids:
            if s not in self.slot:
                raise EngineError(f"step: unknown sequence {s!r}")
            if self.length[s] >= self.max_seq_len:
                raise EngineError(f"step: sequence {s!r} is full (max_seq_len {self.max_seq_len})")

    def drop(self, seq_id) -> int:
        if seq_id not in self.slot:
            raise EngineError(f"remove: unknown sequence {seq_id!r}")
        del self.length[seq_id]
        return self.slot.pop(seq_id)


class TorchEngine:
    """The float32 (or bf16) reference model with a fixed pool of KV cache slots.

    A step gathers the caches of the listed slots, runs the model once on the batch, and writes
    the new K/V back: simple and exact, not fast (it is the reference).
    """

    def __init__(self, model, max_batch_size: int = 8, max_seq_len: int | None = None):
        import torch

        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or model.cfg.sequence_len
        self.vocab_size = model.cfg.vocab_size
        self.cache = model.new_cache(max_batch_size, self.max_seq_len)
        self.slots = SlotTable(max_batch_size, self.max_seq_len)
        self._torch = torch

    def add(self, seq_id, prompt_ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        slot = self.slots.new(seq_id, len(prompt_ids))
        c = self.cache
        c.valid[slot] = False
        view = type(c)(k=[k[slot:slot + 1] for k in c.k], v=[v[slot:slot + 1] for v in c.v],
                       valid=c.valid[slot:slot + 1])  # views: the model writes into the pool
        with torch.no_grad():
            logits = self.model(torch.tensor([list(prompt_ids)]), cache=view, start=torch.zeros(1, dtype=torch.long))
        return logits[0, -1].numpy().copy()

    def step(self, seq_ids: Sequence, last_tokens: Sequence[int]) -> np.ndarray:
        torch = self._torch
        self.slots.check_step(seq_ids)
        if not seq_ids:
            return np.zeros((0, self.vocab_size), np.float32)
        c = self.cache
        idx = torch.tensor([self.slots.slot[s] for s in seq_ids])
        pos = torch.tensor([self.slots.length[s] for s in seq_ids])
        sub = type(c)(k=[k[idx] for k in c.k], v=[v[idx] for v in c.v], valid=c.valid[idx])
        with torch.no_grad():
            logits = self.model(torch.tensor(list(last_tokens))[:, None], cache=sub, start=pos)
        for i in range(len(c.k)):  # write back only the new position
            c.k[i][idx, pos] = sub.k[i][torch.arange(len(idx)), pos]
            c.v[i][idx, pos] = sub.v[i][torch.arange(len(idx)), pos]
        c.valid[idx, pos] = sub.valid[torch.arange(len(idx)), pos]
        for s in seq_ids:
            self.slots.length[s] += 1
        return logits[:, 0].numpy().copy()

    def remove(self, seq_id) -> None:
        self.slots.drop(seq_id)


def engine_generate(eng: DecoderEngine, prompts: list[list[int]], max_new_tokens: int,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    return_logits: bool = False, stop_at_eos: bool = False, eos_id: int = 2):
    """`generate.generate` on an engine: same sampling calls, same generator, same result type.

    Every prompt is prefilled with `add`, then all sequences decode together with `step`.
    """
    import torch

    from grok_deploy.model.generate import Generation, decode_loop

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if len(prompts) > eng.max_batch_size:
        raise EngineError(f"{len(prompts)} prompts for an engine of max_batch_size {eng.max_batch_size}")
    ids = [object() for _ in prompts]  # private sequence ids
    added = []
    try:
        rows = []
        for i, p in zip(ids, prompts):
            rows.append(eng.add(i, p))
            added.append(i)
        out, logits = decode_loop(torch.from_numpy(np.stack(rows)),
                                  lambda nxt: torch.from_numpy(eng.step(ids, nxt.tolist())),
                                  max_new_tokens, temperature, top_p, seed, return_logits, stop_at_eos, eos_id)
    finally:
        for i in added:
            eng.remove(i)
    return Generation([list(p) for p in prompts], out, logits)
