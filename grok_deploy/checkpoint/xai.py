"""The official release format: `ckpt-0/tensor{i:05d}_000`, one pickled leaf per file, in JAX's
flatten order (xai-checkpoint-format.md §1-§5). Reading memory-maps the payloads; nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grok_deploy.checkpoint import pickle_io
from grok_deploy.checkpoint.base import Checkpoint, TensorInfo, match_config
from grok_deploy.checkpoint.pickle_io import BF16, ArrayRef, QW8Ref
from grok_deploy.errors import UserError
from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig

CKPT_DIR = "ckpt-0"
FILE_RE = re.compile(r"tensor(\d{5})_(\d{3})")
INT8_MAX = 127


def tensor_file(index: int) -> str:
    return f"tensor{index:05d}_000"


@dataclass(eq=False)
class QuantizedWeight8bit:
    """The release's quantised matrix: W[..., i, n] = weight[..., i, n] * scales[..., i // (K/B), n]."""

    weight: np.ndarray  # int8 [..., K, N]
    scales: np.ndarray  # bfloat16 [..., B, N], B = 1 (per column) or 8 (K-blocks)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape


def dequantize(qw, out: np.ndarray | None = None) -> np.ndarray:
    """q * s in float32 (exact: int8 and bf16 are exact in f32, one rounding per product).

    Works on a whole stacked leaf or on one expert's slice with its scales. `out`, if given, is a
    C-contiguous float32 array of the weight's shape that receives the result.
    """
    w = np.asarray(qw.weight)
    s = np.asarray(qw.scales).astype(np.float32)
    *lead, k, n = w.shape
    blocks = s.shape[-2]
    if s.shape[:-2] != tuple(lead) or s.shape[-1] != n or k % blocks:
        raise ValueError(f"scales {s.shape} do not fit weight {w.shape}")
    if out is None:
        out = np.empty(w.shape, np.float32)
    elif out.shape != w.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {w.shape}")
    out[...] = w
    view = out.reshape(*lead, blocks, k // blocks, n)  # (..., B, K/B, N), a view of out
    np.multiply(view, s[..., :, None, :], out=view)
    return out


def quantize_blocks(w: np.ndarray, k_blocks: int) -> QuantizedWeight8bit:
    """Symmetric int8 with one scale per (K-block, column): s = bf16(absmax / 127), q = clip(rint(w / s)).

    The scale is rounded to bf16 before quantising, so q * s uses exactly the stored scale.
    """
    w = np.asarray(w, dtype=np.float32)
    *lead, k, n = w.shape
    if k % k_blocks:
        raise ValueError(f"K={k} does not split into {k_blocks} blocks")
    blocks = w.reshape(*lead, k_blocks, k // k_blocks, n)
    scales = (np.abs(blocks).max(axis=-2) / np.float32(INT8_MAX)).astype(BF16)  # (..., B, N)
    s = scales.astype(np.float32)
    s[s == 0] = 1.0  # all-zero columns: q = 0 whatever the divisor
    q = blocks / s[..., :, None, :]
    np.rint(q, out=q)
    np.clip(q, -INT8_MAX, INT8_MAX, out=q)
    return QuantizedWeight8bit(q.astype(np.int8).reshape(w.shape), scales)


# --- what each file must hold ------------------------------------------------------------------

def _expected(cfg: GrokConfig, path: str) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    shape, scales = names.leaf_shape(cfg, path), names.scale_shape(cfg, path)
    if scales is None:
        return [("array", np.dtype(np.float32), shape)]
    return [("weight", np.dtype(np.int8), shape), ("scales", BF16, scales)]


def _mismatch(cfg: GrokConfig, path: str, found: list[tuple[str, np.dtype, tuple[int, ...]]]) -> str | None:
    """Why `found` (part, dtype, shape) is not what the release stores for `path`, or None."""
    want = _expected(cfg, path)
    if [p for p, _, _ in found] != [p for p, _, _ in want]:
        kind = "a QuantizedWeight8bit (int8 weight, bf16 scales)" if len(want) == 2 else "a float32 array"
        return f"{path} must be {kind}"
    for (part, dt, shape), (_, wdt, wshape) in zip(found, want):
        if dt != wdt or tuple(shape) != wshape:
            return f"{path} {part} is {dt} {list(shape)}, expected {wdt} {list(wshape)} for {cfg.name}"
    return None


def _parts(ref: ArrayRef | QW8Ref):
    if isinstance(ref, QW8Ref):
        return [("weight", ref.weight.dtype, ref.weight.shape), ("scales", ref.scales.dtype, ref.scales.shape)]
    return [("array", ref.dtype, ref.shape)]


# --- reading -------------------------------------------------------------------------------------

class XaiCheckpoint(Checkpoint):
    format = "xai"

    def __init__(self, path: Path, ckpt_dir: Path, config: GrokConfig, tokenizer_path: Path):
        self.path, self.dir, self.config, self.tokenizer_path = path, ckpt_dir, config, tokenizer_path
        self._index = {p: i for i, p in enumerate(self.names())}
        self._refs: dict[str, ArrayRef | QW8Ref] = {}

    def file(self, name: str) -> Path:
        if name not in self._index:
            raise KeyError(f"{name!r} is not a leaf of {self.config.name}")
        return self.dir / tensor_file(self._index[name])

    def ref(self, name: str) -> ArrayRef | QW8Ref:
        """Where the leaf's arrays lie (scanned once, checked against the config)."""
        if name not in self._refs:
            file = self.file(name)
            ref = pickle_io.scan(file)
            problem = _mismatch(self.config, name, _parts(ref))
            if problem:
                raise UserError(f"{file}: {problem}; the file does not belong to this checkpoint")
            self._refs[name] = ref
        return self._refs[name]

    def infos(self) -> list[TensorInfo]:
        out = []
        for name in self.names():
            ref = self.ref(name)
            q = isinstance(ref, QW8Ref)
            w = ref.weight if q else ref
            out.append(TensorInfo(name, w.shape, w.dtype.name, q, f"{CKPT_DIR}/{w.file.name}",
                                  ref.scales.shape if q else None))
        return out

    def read(self, name: str) -> np.ndarray:
        ref = self.ref(name)
        if not isinstance(ref, QW8Ref):
            return ref.read()
        if len(ref.weight.shape) < 3:
            return dequantize(QuantizedWeight8bit(ref.weight.load(), ref.scales.read()))
        # one expert at a time: at most one expert's int8 pages are mapped besides the output
        out = np.empty(ref.weight.shape, np.float32)
        scales = ref.scales.read()
        for e in range(out.shape[0]):
            dequantize(QuantizedWeight8bit(ref.weight.load_index(e), scales[e]), out=out[e])
        return out

    def read_expert(self, name: str, e: int) -> np.ndarray:
        self._expert_check(name, e)
        ref = self.ref(name)
        if isinstance(ref, QW8Ref):
            return dequantize(QuantizedWeight8bit(ref.weight.load_index(e), ref.scales.read(e)))
        return ref.read(e)

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        ref = self.ref(name)
        if isinstance(ref, QW8Ref) or ref.fortran or len(ref.shape) != 2:
            return super().read_rows(name, lo, hi)
        mm = ref.load()  # a memory map: only the rows asked for are touched, then unmapped
        out = np.array(mm[lo:hi], np.float32)
        del mm
        return out

    def read_raw(self, name: str):
        """Read-only memory maps: an f32 ndarray, or QuantizedWeight8bit(int8 weight, bf16 scales)."""
        ref = self.ref(name)
        if isinstance(ref, QW8Ref):
            return QuantizedWeight8bit(ref.weight.load(), ref.scales.load())
        return ref.load()


def _ranges(indices: list[int]) -> str:
    """[3, 10, 11, 12] -> '00003, 00010-00012'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a:05d}" if a == b else f"{a:05d}-{b:05d}" for a, b in runs)


def _indices(ckpt_dir: Path) -> set[int]:
    present = set()
    for p in ckpt_dir.iterdir():
        m = FILE_RE.fullmatch(p.name)
        if not m:
            continue
        if m.group(2) != "000":
            raise UserError(f"{p}: a host-shard file; the release has one whole tensor per file "
                            "(tensorNNNNN_000 only) and this reader does not merge host shards")
        present.add(int(m.group(1)))
    return present


def open_xai(path: Path, tokenizer: Path, preset: str | GrokConfig | None) -> XaiCheckpoint:
    """Check the file set of `path/ckpt-0`, measure the model sizes and find the config."""
    ckpt_dir = path / CKPT_DIR
    present = _indices(ckpt_dir)
    if not present:
        raise UserError(f"{ckpt_dir}: no tensorNNNNN_000 files; download ckpt-0/* of xai-org/grok-1 into it")
    given = None if preset is None else preset if isinstance(preset, GrokConfig) else GrokConfig.from_name(preset)
    layers = given.num_layers if given else max(1, -(-(max(present) - 1) // len(names.LAYER_LEAVES)))
    expected = len(names.flatten_order(layers))
    missing = sorted(set(range(expected)) - present)
    if missing and given is None:
        run = next(i for i in range(len(present) + 1) if i not in present)  # files 0..run-1 are all there
        low = (run - len(names.flatten_order(0))) // len(names.LAYER_LEAVES)
        fewer = len(names.flatten_order(max(low, 0)))
        beyond = sorted(i for i in present if i >= fewer)
        if low > 0 and len(beyond) < len(missing):  # whole for `low` layers and a few files beyond it
            raise UserError(f"{ckpt_dir}: {len(present)} tensor files fit no layer count: a {low}-layer checkpoint "
                            f"has {fewer} (then {_ranges(beyond)} would be extra: remove "
                            f"them), a {layers}-layer one {expected} (then {_ranges(missing)} would be missing: download "
                            "them again); pass --preset (model.preset) to say which")
    if missing:
        why = f" for preset {given.name} ({layers} layers)" if given else ""
        raise UserError(f"{ckpt_dir}: {len(missing)} of {expected} tensor files missing{why}, indices "
                        f"{_ranges(missing)}; download them again")
    extra = sorted(i for i in present if i >= expected)
    if extra:
        raise UserError(f"{ckpt_dir}: {len(present)} tensor files, but {given.name} has {layers} layers "
                        f"({expected} files); unexpected indices {_ranges(extra)}; remove those files or pass the right preset")
    order = names.flatten_order(layers)

    def shape(path: str) -> tuple[int, ...]:
        ref = pickle_io.scan(ckpt_dir / tensor_file(order.index(path)))
        return (ref.weight if isinstance(ref, QW8Ref) else ref).shape or (0,)

    emb = shape(names.EMBEDDING)
    if len(emb) != 2:
        raise UserError(f"{ckpt_dir / tensor_file(0)}: the embedding has shape {list(emb)}, expected [vocab, emb]")
    found = {"vocab_size": emb[0], "emb_size": emb[1], "num_layers": layers,
             "q_size": shape(names.layer_path(0, "multi_head_attention/query/w"))[-1],
             "kv_size": shape(names.layer_path(0, "multi_head_attention/key/w"))[-1],
             "ffn_size": shape(names.layer_path(0, "moe/linear/w"))[-1]}
    return XaiCheckpoint(path, ckpt_dir, match_config(ckpt_dir, found, given), tokenizer)


# --- writing -------------------------------------------------------------------------------------

def _value_parts(value) -> list:
    if isinstance(value, np.ndarray):
        return [("array", value.dtype, value.shape)]
    w, s = np.asarray(value.weight), np.asarray(value.scales)
    return [("weight", w.dtype, w.shape), ("scales", s.dtype, s.shape)]


def write_checkpoint(out_dir, cfg: GrokConfig, leaves: Mapping | Iterable, progress: bool = False) -> Path:
    """Write `out_dir/ckpt-0/tensor{i:05d}_000` for every leaf; returns the ckpt-0 folder.

    `leaves`: a mapping or an iterable of (path, value), value a float32 ndarray or a
    QuantizedWeight8bit, each as the release stores it for `cfg`. Files are written one at a time
    (temporary name, then rename), as pickles the original loader reads; same input, same bytes.
    """
    out = Path(out_dir) / CKPT_DIR
    out.mkdir(parents=True, exist_ok=True)
    order = names.flatten_order(cfg.num_layers)
    index = {p: i for i, p in enumerate(order)}
    stale = [p.name for p in out.iterdir() if (m := FILE_RE.fullmatch(p.name))
             and (int(m.group(1)) >= len(order) or m.group(2) != "000")]
    if stale:
        raise UserError(f"{out}: holds tensor files of another checkpoint ({stale[0]}); write into an empty folder")
    done: set[str] = set()
    bar = contextlib.nullcontext()
    if progress:
        from grok_deploy.progress import Progress
        bar = Progress(None, f"write {out}", total_items=len(order))
    with bar:
        for path, value in leaves.items() if isinstance(leaves, Mapping) else leaves:
            if path not in index or path in done:
                raise ValueError(f"{path!r}: {'written twice' if path in done else 'not a leaf of ' + cfg.name}")
            problem = _mismatch(cfg, path, _value_parts(value))
            if problem:
                raise ValueError(problem)
            target = out / tensor_file(index[path])
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    pickle_io.dump(f, value)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            done.add(path)
            if progress:
                bar.update(target.stat().st_size, name=path)
    missing = [p for p in order if p not in done]
    if missing:
        raise ValueError(f"{len(missing)} leaves were not given, e.g. {missing[0]}")
    return out
