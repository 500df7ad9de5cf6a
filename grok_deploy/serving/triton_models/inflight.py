"""In-flight batching behind the python-backend `tensorrt_llm` model, free of Triton (unit-tested).

`Scheduler` owns a decoder engine (engine.py protocol) and a thread running the decode loop: each
turn admits waiting sequences (`engine.add` = prefill and first token), drops cancelled ones, then
runs ONE `engine.step` over every live sequence. A request arriving while others decode joins at
the next step; a finished one leaves (`engine.remove`) at once. Each `Seq` reports to its sink
(tokens, the end, or an error) exactly once at the end.
"""
from __future__ import annotations

import collections
import itertools
import secrets
import threading
import time
from typing import Callable

import numpy as np

from grok_deploy.model.engine import EngineError
from grok_deploy.serving.triton_models.params import BadRequest, Params, next_token

CANCEL_CHECK_S = 0.05  # how often clients' cancellations are polled (an IPC call per request)


class Seq:
    """One batch row of a request. `sink` gets tokens and the end: see `Sink` in tensorrt_llm.py."""

    _ids = itertools.count()

    def __init__(self, params: Params, sink, row: int = 0, request_id: str = ""):
        import torch

        self.key = next(Seq._ids)
        self.params, self.sink, self.row, self.request_id = params, sink, row, request_id
        self.secret = secrets.randbits(63)  # grok_sequence_key: names this sequence alone in a stop
        self.out: list[int] = []
        self.log_probs: list[float] = []
        self.logits: list[np.ndarray] = []
        self.last: int | None = None
        self.reason: str | None = None  # length | end_id | stop_words | cancelled | error
        self.generator = torch.Generator().manual_seed(params.seed % (1 << 63))
        self.cancel_flag = False
        self.ended = False  # Scheduler.on_end has seen it
        # return_perf_metrics: ns since the epoch (0 = not yet)
        self.arrival_ns, self.scheduled_ns, self.first_token_ns, self.last_token_ns = time.time_ns(), 0, 0, 0

    def cancelled(self) -> bool:
        return self.cancel_flag or self.sink.cancelled()


class Scheduler:
    """Runs `engine` on a thread; `submit(seq)` from any thread. `on_step(batch_size)` per step;
    `on_turn(stats)` after each turn of the loop, with `turn_stats` (the backend's iteration stats);
    `on_end(seq)` once per submitted sequence, as it ends (done, cancelled or failed), before its
    final response goes out (the backend's per-request token histograms)."""

    def __init__(self, engine, on_step: Callable[[int], None] | None = None, log=None,
                 on_turn: Callable[[dict], None] | None = None, on_end: Callable[[Seq], None] | None = None):
        self.engine, self.on_step, self.log, self.on_turn, self.on_end = engine, on_step, log, on_turn, on_end
        self.iterations = 0
        self.cv = threading.Condition()
        self.pending: collections.deque[Seq] = collections.deque()
        self.live: list[Seq] = []
        self.closing = False
        self.checked = 0.0  # time.monotonic() of the last cancellation poll
        self.batch_sizes: collections.Counter = collections.Counter()  # decode step size -> count
        self.thread = threading.Thread(target=self._loop, name="inflight-batching", daemon=True)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def submit(self, seq: Seq) -> None:
        with self.cv:
            if self.closing:
                raise BadRequest("the model is shutting down", "UNAVAILABLE")
            self.pending.append(seq)
            self.cv.notify()

    def cancel(self, request_id: str, secret: int | None = None) -> int:
        """Cancel every waiting or live sequence of `request_id` (ids are the clients' choice:
        several may share one), or only the one whose `secret` is given; returns how many."""
        with self.cv:
            hit = [s for s in (*self.pending, *self.live)
                   if s.request_id == request_id and (secret is None or s.secret == secret)]
            for s in hit:
                s.cancel_flag = True
            self.cv.notify()
        return len(hit)

    def close(self, timeout: float = 10.0) -> None:
        with self.cv:
            self.closing = True
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # --- the loop (scheduler thread only) ---
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (self.pending or self.live or self.closing):
                    self.cv.wait()
                if self.closing:
                    break
                poll = time.monotonic() - self.checked > CANCEL_CHECK_S
                gone = [s for s in self.pending if s.cancelled()] if poll else []
                for s in gone:
                    self.pending.remove(s)
                room = self.engine.max_batch_size - len(self.live)
                new = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
            try:
                self._turn(gone, new, poll)
            except Exception as e:  # noqa: BLE001 - a bug here fails the live requests, not the model
                self._warn(f"decode loop: {type(e).__name__}: {e}")
                for seq in dict.fromkeys([*self.live, *(s for s in new if s.reason is None)]):
                    self._fail(seq, f"internal error: {type(e).__name__}: {e}", "INTERNAL")
            gone = new = seq = s = None  # a finished request must not stay referenced while we wait
        with self.cv:
            left = [*self.pending, *self.live]
            self.pending.clear()
        for seq in left:
            self._fail(seq, "the model is shutting down", "UNAVAILABLE")

    def _turn(self, gone: list[Seq], new: list[Seq], poll: bool) -> None:
        """Admit the new sequences, drop the cancelled ones, then one decode step for all."""
        for seq in gone:
            self._emit(seq, [], "cancelled")
        for seq in new:
            self._admit(seq)
        if poll:
            self.checked = time.monotonic()
            for seq in [s for s in self.live if s.cancelled()]:
                self._finish(seq, "cancelled")
        admitted = {s.key for s in new}
        generation = sum(s.key not in admitted for s in self.live)  # decoding since an earlier turn
        if self.live:
            self._step()
        self.iterations += 1
        if self.on_turn:
            try:
                self.on_turn(self.turn_stats(new, generation))
            except Exception as e:  # noqa: BLE001 - statistics must not stop decoding
                self._warn(f"on_turn: {e}")

    def turn_stats(self, new: list[Seq], generation: int = 0) -> dict:
        """Counts of this turn: sequences waiting, admitted (context phase, and their prompt
        tokens), in their generation phase (`generation`: stepped this turn, prefilled in an
        earlier one), decoding after the turn (active = scheduled: every live sequence is stepped),
        the engine's slots (max), and iterations so far. Nothing is ever paused: an admitted
        sequence keeps its slot to its end."""
        live = len(self.live)
        return {"waiting": len(self.pending), "context": len(new),
                "context_tokens": sum(len(s.params.prompt) for s in new), "generation": generation,
                "paused": 0, "scheduled": live, "active": live,
                "max": self.engine.max_batch_size, "iterations": self.iterations}

    def _admit(self, seq: Seq) -> None:
        if seq.cancelled():
            return self._emit(seq, [], "cancelled")
        p = seq.params
        p.max_new = min(p.max_new, self.engine.max_seq_len - len(p.prompt))  # clamped, as TensorRT-LLM
        seq.scheduled_ns = time.time_ns()
        try:
            logits = self.engine.add(seq.key, p.prompt)
        except EngineError as e:
            return self._fail(seq, str(e), "INVALID_ARG")
        except Exception as e:  # noqa: BLE001 - reported to the client, the loop keeps serving
            return self._fail(seq, f"prefill failed: {type(e).__name__}: {e}", "INTERNAL")
        self.live.append(seq)
        self._advance_one(seq, logits)

    def _step(self) -> None:
        seqs = list(self.live)
        try:
            rows = self.engine.step([s.key for s in seqs], [s.last for s in seqs])
        except Exception as e:  # noqa: BLE001
            for s in seqs:
                self._fail(s, f"decode step failed: {type(e).__name__}: {e}", "INTERNAL")
            return
        self.batch_sizes[len(seqs)] += 1
        if self.on_step:
            try:
                self.on_step(len(seqs))
            except Exception as e:  # noqa: BLE001 - statistics must not stop decoding
                self._warn(f"on_step: {e}")
        for s, row in zip(seqs, rows):
            self._advance_one(s, row)

    def _advance_one(self, seq: Seq, logits: np.ndarray) -> None:
        """`_advance`, isolated: whatever goes wrong with one sequence (its sampling, its logits,
        its sink) ends that sequence's request with an error; the rest of the batch decodes on."""
        try:
            self._advance(seq, logits)
        except Exception as e:  # noqa: BLE001
            self._warn(f"request {seq.request_id!r}: {type(e).__name__}: {e}")
            self._fail(seq, f"sampling failed for this request: {type(e).__name__}: {e}", "INTERNAL")

    def _advance(self, seq: Seq, logits: np.ndarray) -> None:
        import torch

        p = seq.params
        tok, x = next_token(logits, p, p.prompt + seq.out, len(seq.out), seq.generator)
        seq.last_token_ns = time.time_ns()
        seq.first_token_ns = seq.first_token_ns or seq.last_token_ns
        if tok == p.end_id:
            return self._finish(seq, "end_id")
        seq.out.append(tok)
        seq.last = tok
        if p.return_log_probs:
            seq.log_probs.append(float(torch.log_softmax(x, -1)[tok]))
        if p.return_generation_logits:
            seq.logits.append(np.asarray(logits, np.float32))
        reason = None
        if any(w and seq.out[-len(w):] == w for w in p.stop_words):
            reason = "stop_words"
        elif len(seq.out) >= p.max_new:
            reason = "length"
        if reason:
            return self._finish(seq, reason, [tok])
        self._emit(seq, [tok], None)

    def _finish(self, seq: Seq, reason: str, new: list[int] | None = None) -> None:
        self._drop(seq)
        self._emit(seq, new or [], reason)

    def _drop(self, seq: Seq) -> None:
        if seq in self.live:
            self.live.remove(seq)
            try:
                self.engine.remove(seq.key)
            except Exception as e:  # noqa: BLE001
                self._warn(f"remove({seq.key}) failed: {e}")

    def _emit(self, seq: Seq, new: list[int], reason: str | None) -> None:
        seq.reason = reason
        if reason is not None:
            self._ended(seq)
        try:
            seq.sink.tokens(seq, new, reason is not None)
        except Exception as e:  # noqa: BLE001 - a client gone away must not stop the loop
            self._warn(f"sending to request {seq.request_id!r} failed: {e}")
            if reason is None:
                self._fail(seq, f"sending a response failed: {e}", "INTERNAL")

    def _fail(self, seq: Seq, message: str, code: str) -> None:
        self._drop(seq)
        seq.reason = "error"
        self._ended(seq)
        try:
            seq.sink.error(seq, message, code)
        except Exception as e:  # noqa: BLE001
            self._warn(f"sending an error to request {seq.request_id!r} failed: {e}")

    def _ended(self, seq: Seq) -> None:
        if self.on_end and not seq.ended:
            seq.ended = True
            try:
                self.on_end(seq)
            except Exception as e:  # noqa: BLE001 - statistics must not stop decoding
                self._warn(f"on_end: {e}")

    def _warn(self, message: str) -> None:
        if self.log:
            self.log(message)


def load_engine(kind: str, engine_dir: str, max_batch_size: int, max_seq_len: int):
    """The engine the `tensorrt_llm` model runs: `onnxruntime` (a built ORT engine folder) or
    `torch` (the float32 reference model on a checkpoint folder; exact, for tests)."""
    if kind == "onnxruntime":
        from grok_deploy.onnx.ort_engine import OrtEngine

        # no spinning: the engine shares the cores with Triton, the other stubs and the clients
        return OrtEngine(engine_dir, max_batch_size=max_batch_size, max_seq_len=max_seq_len, spinning=False)
    if kind == "torch":
        from grok_deploy.checkpoint import open_checkpoint
        from grok_deploy.model.engine import TorchEngine
        from grok_deploy.model.generate import load_model

        return TorchEngine(load_model(open_checkpoint(engine_dir)), max_batch_size, max_seq_len)
    raise ValueError(f"engine_kind {kind!r}: use onnxruntime or torch")
