"""Pure sharding functions for the TensorRT-LLM checkpoint (trtllm-checkpoint.md §3, §6).

Everything here takes and returns arrays (numpy, or torch for the slicing helpers) and knows
nothing of files. Matrices are in the official [in, out] layout, experts stacked on axis 0:
column-parallel layers split the last axis, row-parallel layers split axis -2.
"""
from __future__ import annotations

import numpy as np

INT8_MAX = 127


def bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s contiguous chunk when n splits evenly into `world` chunks."""
    if n % world:
        raise ValueError(f"size {n} does not split into {world} equal parts")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    size = n // world
    return rank * size, (rank + 1) * size


def split_axis(w, rank: int, world: int, axis: int):
    """`rank`'s contiguous chunk of w along `axis` (a view where the array type allows)."""
    axis = axis % w.ndim
    lo, hi = bounds(w.shape[axis], rank, world)
    return w[(slice(None),) * axis + (slice(lo, hi),)]


def split_columns(w, rank: int, world: int):
    """Column-parallel split: the output (last) axis."""
    return split_axis(w, rank, world, -1)


def split_rows(w, rank: int, world: int):
    """Row-parallel split: the input axis (-2) of an [..., in, out] matrix."""
    return split_axis(w, rank, world, -2)


def split_experts(w, ep_rank: int, ep: int):
    """Expert parallelism: `ep_rank`'s contiguous group of experts (axis 0)."""
    return split_axis(w, ep_rank, ep, 0)


def _cat(parts, axis: int):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    import torch
    return torch.cat(parts, dim=axis)


def fuse_qkv(q, k, v, rank: int, world: int):
    """[Q_r | K_r | V_r] along the output axis: rank r holds query heads G*r.. and KV head r
    (for weights [D, N] and for scales [1, N] alike)."""
    return _cat([split_columns(x, rank, world) for x in (q, k, v)], -1)


def fuse_fc(linear_v, linear, rank: int, world: int):
    """MoE fc = [linear_v_r | linear_r] along the output axis: the linear branch first, the
    GELU-gated branch second (the plugin activates the right half)."""
    return _cat([split_columns(linear_v, rank, world), split_columns(linear, rank, world)], -1)


def block_of_slice(k: int, n_blocks: int, rank: int, world: int) -> int | None:
    """The K-block holding all of `rank`'s row slice [lo, hi) of a K-row matrix with `n_blocks`
    scale blocks, or None when the slice spans blocks (then the codes must be requantised)."""
    lo, hi = bounds(k, rank, world)
    block = k // n_blocks
    return lo // block if lo // block == (hi - 1) // block else None


def dequantize_rows(q: np.ndarray, scales: np.ndarray, lo: int, k: int) -> np.ndarray:
    """Rows lo..lo+len of a block-scaled matrix, dequantised exactly in float32.

    q (..., rows, N) int8 is the slice starting at global row `lo`; scales (..., n_blocks, N)
    bf16 are the whole matrix's block scales; `k` is the whole matrix's row count.
    """
    n_blocks = scales.shape[-2]
    block_of_row = (lo + np.arange(q.shape[-2])) // (k // n_blocks)  # (rows,)
    s = np.take(scales.astype(np.float32), block_of_row, axis=-2)   # (..., rows, N)
    return q.astype(np.float32) * s


def round_to(x: np.ndarray, dtype) -> np.ndarray:
    """x rounded to `dtype` (bf16, f16, f32) and back to float32."""
    return np.asarray(x, dtype=np.float32).astype(dtype).astype(np.float32)


def requant_scale(absmax: np.ndarray, scale_dtype) -> np.ndarray:
    """Per-channel scale from max |w| of each output column: s = scale_dtype(absmax / 127),
    rounded *before* quantising, so that the stored scale is the one the codes were made with."""
    return round_to(absmax / INT8_MAX, scale_dtype).astype(scale_dtype)


def quantize_with(w: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, float]:
    """q = clamp(round(w / s), -127, 127) for w (..., K, N) float32 and scales s (..., N);
    returns (q int8, largest |w - q*s|). A zero scale (all-zero column) gives codes 0."""
    s32 = s.astype(np.float32)[..., None, :]
    t = np.divide(w, np.where(s32 > 0, s32, np.float32(1)), dtype=np.float32)  # one temporary, reused
    np.clip(np.rint(t, out=t), -INT8_MAX, INT8_MAX, out=t)
    q = t.astype(np.int8)
    np.multiply(q, s32, out=t)
    np.abs(np.subtract(w, t, out=t), out=t)
    return q, float(t.max())


def requantize(w: np.ndarray, scale_dtype) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-output-channel int8 of w (..., K, N) float32 (trtllm-checkpoint.md §6).
    Returns (q int8 (..., K, N), s (..., N) in scale_dtype, largest |w - q*s|)."""
    s = requant_scale(np.maximum(w.max(axis=-2), -w.min(axis=-2)), scale_dtype)
    q, err = quantize_with(w, s)
    return q, s, err


class Mapping:
    """TensorRT-LLM's rank layout: rank = pp_rank * tp + tp_rank; inside a TP group the MoE
    ranks are moe_tp_rank = tp_rank // moe_ep and moe_ep_rank = tp_rank % moe_ep (as
    tensorrt_llm.Mapping); pipeline stage p holds layers p*L/P .. (p+1)*L/P - 1."""

    def __init__(self, tp: int, pp: int = 1, moe_tp: int | None = None, moe_ep: int | None = None):
        self.derived = []  # problems of a moe size derived from --tp
        if moe_tp is None and moe_ep is None:
            moe_tp, moe_ep = tp, 1
        elif moe_tp is None or moe_ep is None:
            flag, given = ("--moe-ep", moe_ep) if moe_tp is None else ("--moe-tp", moe_tp)
            if given < 1 or tp % given:
                self.derived.append(f"{flag} {given} does not divide --tp {tp}")
            other = tp // given if given >= 1 else 0
            moe_tp, moe_ep = (other, moe_ep) if moe_tp is None else (moe_tp, other)
        self.tp, self.pp, self.moe_tp, self.moe_ep = tp, pp, moe_tp, moe_ep

    @property
    def world(self) -> int:
        return self.tp * self.pp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp

    def moe_tp_rank(self, rank: int) -> int:
        return self.tp_rank(rank) // self.moe_ep

    def moe_ep_rank(self, rank: int) -> int:
        return self.tp_rank(rank) % self.moe_ep

    def layers(self, rank: int, num_layers: int) -> range:
        lo, hi = bounds(num_layers, self.pp_rank(rank), self.pp)
        return range(lo, hi)

    def experts(self, rank: int, num_experts: int) -> range:
        lo, hi = bounds(num_experts, self.moe_ep_rank(rank), self.moe_ep)
        return range(lo, hi)

    def to_dict(self) -> dict:
        return {"world_size": self.world, "tp_size": self.tp, "pp_size": self.pp,
                "moe_tp_size": self.moe_tp, "moe_ep_size": self.moe_ep}

    @classmethod
    def from_dict(cls, d: dict) -> "Mapping":
        return cls(d["tp_size"], d.get("pp_size", 1), d.get("moe_tp_size"), d.get("moe_ep_size"))

    def problems(self, cfg) -> list[str]:
        """Why this layout cannot shard `cfg` (a GrokConfig); empty when it can."""
        if self.derived:
            return list(self.derived)
        out = []
        for flag, v in (("--tp", self.tp), ("--pp", self.pp), ("--moe-tp", self.moe_tp), ("--moe-ep", self.moe_ep)):
            if v < 1:
                out.append(f"{flag} {v} must be >= 1")
        if out:
            return out
        if self.moe_tp * self.moe_ep != self.tp:
            out.append(f"--moe-tp {self.moe_tp} x --moe-ep {self.moe_ep} must equal --tp {self.tp}")
        checks = (
            (cfg.num_kv_heads, self.tp, "--tp", "kv heads"),  # no KV-head duplication (§3.1)
            (cfg.num_q_heads, self.tp, "--tp", "q heads"),
            (cfg.vocab_size, self.tp, "--tp", "vocab size"),  # lm_head vocab shards
            (cfg.num_experts, self.moe_ep, "--moe-ep", "experts"),
            (cfg.ffn_size, self.moe_tp, "--moe-tp", "ffn size"),
            (cfg.num_layers, self.pp, "--pp", "layers"),
        )
        for n, k, flag, what in checks:
            if k >= 1 and n % k:
                out.append(f"{flag} {k} does not divide the {what} ({n}) of {cfg.name}")
        return out
