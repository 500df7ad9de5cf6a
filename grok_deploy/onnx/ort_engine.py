"""The ONNX Runtime engine: build (optimise once, save in the engine folder) and run with a KV cache.

`build_engine(onnx_dir, out)` loads the exported graph with CPU-tuned session options
(intra-op threads = cores, sequential, ORT_ENABLE_ALL), saves the optimised graph as
`out/model.opt.onnx` (+ `model.opt.onnx.data`, external initializers) and writes a manifest.

`OrtEngine(engine_dir)` implements the decoder engine protocol (engine.py):
- one preallocated cache per layer for K and for V, (max_batch, kv_heads, max_seq_len, head);
- live sequences occupy slots 0..n-1 (a removal moves the last sequence into the hole), so a
  batch is a contiguous prefix of the pool and is bound with IOBinding as both past and present:
  the graph scatters the new K/V in place, nothing is copied whole per step;
- each sequence decodes at its own position; `generate` has the reference's semantics.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from grok_deploy.model.engine import EngineError, SlotTable, engine_generate

OPT_MODEL, OPT_DATA = "model.opt.onnx", "model.opt.onnx.data"


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session_options(threads: int, level: str = "all", spinning: bool = True):
    """CPU session options: `threads` intra-op threads, sequential, ORT_ENABLE_ALL (or none, to
    load an already optimised graph). Spinning threads cut latency; turn it off when sharing cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def build_engine(onnx_dir, out, threads: int | None = None, max_batch_size: int = 8,
                 max_seq_len: int | None = None) -> dict:
    """Optimise the exported graph for this CPU and save it with a manifest into `out`."""
    import onnxruntime as ort

    from grok_deploy import __version__
    from grok_deploy.errors import UserError
    from grok_deploy.manifest import atomic_dir
    from grok_deploy.model.config import GrokConfig

    onnx_dir = Path(onnx_dir)
    try:
        src = json.loads((onnx_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{onnx_dir}/manifest.json: not readable ({e}); run export-onnx first") from None
    cfg = GrokConfig.from_dict(src["config"])
    threads = threads or default_threads()
    max_seq_len = max_seq_len or cfg.sequence_len
    if max_seq_len > cfg.sequence_len:
        raise UserError(f"max_seq_len {max_seq_len} exceeds {cfg.name}'s {cfg.sequence_len} positions")
    t0 = time.perf_counter()
    with atomic_dir(out, "build") as tmp:
        so = session_options(threads)
        so.optimized_model_filepath = str(tmp / OPT_MODEL)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPT_DATA)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(onnx_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        manifest = {
            "stage": "build-engine", "backend": "onnxruntime", "version": __version__,
            "onnxruntime": ort.__version__, "source": str(onnx_dir.resolve()),
            "source_files": src["files"], "preset": cfg.name, "config": src["config"],
            "quant": src["quant"], "io": src["io"], "model": OPT_MODEL,
            "session": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                        "execution_mode": "sequential", "graph_optimization_level": "ORT_ENABLE_ALL",
                        "allow_spinning": "on by default; OrtEngine(spinning=False) when sharing cores",
                        "load_optimization_level": "ORT_DISABLE_ALL (already optimised)",
                        "note": "the optimised graph is specific to this CPU; rebuild on another host"},
            "max_batch_size": max_batch_size, "max_seq_len": max_seq_len, "vocab_size": cfg.vocab_size,
            "kv_cache": {"layout": "per layer (max_batch, kv_heads, max_seq_len, head) f32, preallocated",
                         "update": "IOBinding: the same OrtValue bound as past and present (in place)",
                         "bytes_per_token": 2 * cfg.num_layers * cfg.kv_size * 4},
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        manifest["onnxruntime_genai"] = _genai_files(onnx_dir, tmp, cfg, threads)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _genai_files(onnx_dir: Path, out: Path, cfg, threads: int) -> dict | None:
    """The engine folder opens in onnxruntime-genai too: its genai_config.json names the optimised
    graph, loaded as the engine loads it (no re-optimisation, the same threads); tokenizer files
    copied from the export. None when the export has no genai_config.json (an older export)."""
    import shutil

    from grok_deploy.onnx.genai import GENAI_CONFIG, write_genai_files

    src = json.loads((onnx_dir / "manifest.json").read_text()).get("onnxruntime_genai")
    if not src or not (onnx_dir / GENAI_CONFIG).is_file():
        return None
    write_genai_files(out, cfg, None, OPT_MODEL, {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                                  "graph_optimization_level": "ORT_DISABLE_ALL"})
    for name in src["files"][1:]:
        shutil.copy2(onnx_dir / name, out / name)
    return {"config": GENAI_CONFIG, "files": src["files"]}


class OrtEngine:
    """Decoder engine over ONNX Runtime (protocol in engine.py), plus a batched `generate`."""

    def __init__(self, engine_dir, max_batch_size: int | None = None, max_seq_len: int | None = None,
                 threads: int | None = None, spinning: bool = True):
        import onnxruntime as ort

        from grok_deploy.errors import UserError
        from grok_deploy.model.config import GrokConfig

        engine_dir = Path(engine_dir)
        try:
            self.manifest = json.loads((engine_dir / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{engine_dir}/manifest.json: not readable ({e}); run the engine build first") from None
        self.cfg = c = GrokConfig.from_dict(self.manifest["config"])
        self.max_batch_size = max_batch_size or self.manifest["max_batch_size"]
        self.max_seq_len = max_seq_len or self.manifest["max_seq_len"]
        self.vocab_size = c.vocab_size
        threads = threads or self.manifest["session"]["intra_op_num_threads"]
        self.sess = ort.InferenceSession(str(engine_dir / self.manifest["model"]),
                                         session_options(threads, "none", spinning),
                                         providers=["CPUExecutionProvider"])
        # (layers, k|v, slots, kv_heads, positions, head); np.zeros maps pages lazily
        self.kv = np.zeros((c.num_layers, 2, self.max_batch_size, c.num_kv_heads, self.max_seq_len, c.key_size),
                           np.float32)
        self.valid = np.zeros((self.max_batch_size, self.max_seq_len), np.int64)
        self.slots = SlotTable(self.max_batch_size, self.max_seq_len)
        self._bindings: dict[tuple[int, int], object] = {}
        self._ort = ort

    # --- running the graph on slots [lo, hi) -------------------------------------------------
    def _binding(self, lo: int, hi: int):
        """An IOBinding with the pool's slots [lo, hi) bound as every past and present (no copy)."""
        if (lo, hi) not in self._bindings:
            io = self.sess.io_binding()
            for i in range(self.cfg.num_layers):
                for j, kind in enumerate(("key", "value")):
                    ov = self._ort.OrtValue.ortvalue_from_numpy(self.kv[i, j, lo:hi])
                    io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                    io.bind_ortvalue_output(f"present.{i}.{kind}", ov)
            self._bindings[(lo, hi)] = io
        return self._bindings[(lo, hi)]

    def _run(self, ids: np.ndarray, pos: np.ndarray, lo: int, hi: int) -> np.ndarray:
        io = self._binding(lo, hi)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", pos)
        io.bind_cpu_input("attention_mask", self.valid[lo:hi])
        io.bind_output("logits", "cpu")
        self.sess.run_with_iobinding(io)
        return io.get_outputs()[-1].numpy()  # (B, T, V); bound last

    # --- protocol -------------------------------------------------------------------------------
    def add(self, seq_id, prompt_ids: Sequence[int]) -> np.ndarray:
        slot = self.slots.new(seq_id, len(prompt_ids))
        ids = np.asarray([prompt_ids], np.int64)
        self.valid[slot] = 0
        self.valid[slot, :ids.shape[1]] = ids[0] != self.cfg.pad_id
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        return self._run(ids, pos, slot, slot + 1)[0, -1].copy()

    def step(self, seq_ids: Sequence, last_tokens: Sequence[int]) -> np.ndarray:
        self.slots.check_step(seq_ids)
        if len(last_tokens) != len(seq_ids):
            raise EngineError(f"step: {len(seq_ids)} sequences but {len(last_tokens)} tokens")
        m = len(seq_ids)
        if m == 0:
            return np.zeros((0, self.vocab_size), np.float32)
        self._to_front(seq_ids)
        rows = np.array([self.slots.slot[s] for s in seq_ids])
        ids, pos = np.zeros((m, 1), np.int64), np.zeros((m, 1), np.int64)
        ids[rows, 0] = last_tokens
        pos[rows, 0] = [self.slots.length[s] for s in seq_ids]
        self.valid[rows, pos[rows, 0]] = ids[rows, 0] != self.cfg.pad_id
        logits = self._run(ids, pos, 0, m)[:, 0]
        for s in seq_ids:
            self.slots.length[s] += 1
        return logits[rows]

    def remove(self, seq_id) -> None:
        hole = self.slots.drop(seq_id)
        last = len(self.slots.slot)
        if hole != last:  # keep live slots contiguous: move the last sequence into the hole
            mover = next(s for s, k in self.slots.slot.items() if k == last)
            n = self.slots.length[mover]
            self.kv[:, :, hole, :, :n] = self.kv[:, :, last, :, :n]
            self.valid[hole] = self.valid[last]
            self.slots.slot[mover] = hole

    def _to_front(self, seq_ids: Sequence) -> None:
        """Make the listed sequences occupy slots 0..m-1 (swaps only when a subset is stepped)."""
        m = len(seq_ids)
        outside = [s for s in seq_ids if self.slots.slot[s] >= m]
        wanted = set(seq_ids)
        inside = [s for s, k in self.slots.slot.items() if k < m and s not in wanted]
        for a, b in zip(outside, inside):
            sa, sb = self.slots.slot[a], self.slots.slot[b]
            n = max(self.slots.length[a], self.slots.length[b])
            tmp = self.kv[:, :, sa, :, :n].copy()
            self.kv[:, :, sa, :, :n] = self.kv[:, :, sb, :, :n]
            self.kv[:, :, sb, :, :n] = tmp
            self.valid[[sa, sb]] = self.valid[[sb, sa]]
            self.slots.slot[a], self.slots.slot[b] = sb, sa

    # --- batched generation with the reference's semantics -----------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, return_logits: bool = False):
        """As `generate.generate`: prefill each prompt, then decode all together (one step per token)."""
        return engine_generate(self, prompts, max_new_tokens, temperature, top_p, seed, return_logits,
                               eos_id=self.cfg.eos_id)
