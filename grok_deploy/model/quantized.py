"""Matrices kept as int8 codes x scales, multiplied without ever being dequantised whole.

`x @ QuantizedMatrix(codes, scales)` dequantises one block of rows at a time into a small
reused buffer (a few MB, in the CPU cache) and accumulates x[:, rows] @ block: the same values
as x @ dequantize(W), up to float32 summation order, without the 800 MB float32 copy of a
Grok-1 expert matrix, the page faults of allocating it and two passes over it. The streamed
reference (checkpoint/stream.py) and check-shards (trtllm/check_stream.py) hand these to
`grok.expert_ffn` in place of tensors; `ColumnConcat` and `RowConcat` assemble one matrix from
the tensor-parallel slices of TensorRT-LLM rank files the way the canonical matrix is cut.

The compute dtype follows the original: in float32, x @ W block by block as above; in bf16,
W = bf16(q x s) (q x s is exact in float32, then rounded once) is assembled block by block into
one bf16 matrix (half the bytes of float32, no float32 copy) and multiplied by torch's own bf16
GEMM, as the in-RAM model does: a different summation order would round some bf16 outputs the
other way, and one-ulp differences compound over the layers. No I/O: codes may be tensors over
memory maps that a caller opened.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

BLOCK_BYTES = 8 << 20  # float32 bytes of one dequantised block of rows


def over_array(a: np.ndarray) -> Tensor:
    """A tensor over `a` without a copy; `a` may be read-only (a memory map): it is only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": never written through
        return torch.from_numpy(np.ascontiguousarray(a))


class QuantizedMatrix:
    """W[k, n] = codes[k, n] * scales[k // (K / B), n]: codes (K, N) int8, scales (B, N) or (N,)
    (B K-blocks of rows; one row of scales: per output column)."""

    def __init__(self, codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32):
        scales = scales.float().reshape(-1, codes.shape[-1])
        if codes.dim() != 2 or codes.shape[0] % scales.shape[0]:
            raise ValueError(f"scales {tuple(scales.shape)} do not fit codes {tuple(codes.shape)}")
        self.codes, self.scales, self.dtype = codes, scales, dtype

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def columns(self, a: int, b: int) -> "QuantizedMatrix":
        """Columns a..b (a view of the codes)."""
        return QuantizedMatrix(self.codes[:, a:b], self.scales[:, a:b], self.dtype)

    def _blocks(self):
        """(k0, k1, W[k0:k1] as float32 holding the compute dtype's values) over the rows, in
        blocks of BLOCK_BYTES (a block may span K-blocks of scales); the block tensor is a reused
        buffer, valid until the next one."""
        k, n = self.codes.shape
        per_scale = k // self.scales.shape[0]
        rows = max(1, min(k, BLOCK_BYTES // (4 * n)))
        buf = torch.empty(rows, n)
        for k0 in range(0, k, rows):
            k1 = min(k0 + rows, k)
            blk = buf[:k1 - k0]
            blk.copy_(self.codes[k0:k1])
            for b in range(k0 // per_scale, (k1 - 1) // per_scale + 1):  # the scale rows it spans
                a, z = max(k0, b * per_scale), min(k1, (b + 1) * per_scale)
                blk[a - k0:z - k0].mul_(self.scales[b])
            if self.dtype != torch.float32:
                blk.copy_(blk.to(self.dtype))  # rounded to the compute dtype, held exactly in f32
            yield k0, k1, blk

    def dequantize(self) -> Tensor:
        """The whole matrix in the compute dtype (for checks; the point of this class is not to)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        for k0, k1, blk in self._blocks():
            out[k0:k1] = blk
        return out

    def matmul_f32(self, x: Tensor) -> Tensor:
        """x @ W accumulated and returned in float32 (x in any float dtype, (..., K))."""
        lead, k = x.shape[:-1], x.shape[-1]
        if k != self.codes.shape[0]:
            raise ValueError(f"x {tuple(x.shape)} @ W {self.shape}: inner sizes differ")
        x2 = x.reshape(-1, k).float()
        out = torch.zeros(x2.shape[0], self.codes.shape[1])
        for k0, k1, blk in self._blocks():
            out.addmm_(x2[:, k0:k1], blk)
        return out.reshape(*lead, -1)

    def __rmatmul__(self, x: Tensor) -> Tensor:
        if self.dtype != torch.float32:  # the in-RAM model's own GEMM on the same bf16 values:
            return x @ self.dequantize()  # its summation order, so bf16 rounding agrees bit for bit
        return self.matmul_f32(x).to(x.dtype)


def columns(w, a: int, b: int):
    """Columns a..b of a tensor or a QuantizedMatrix."""
    return w.columns(a, b) if isinstance(w, QuantizedMatrix) else w[:, a:b]


class ColumnConcat:
    """[A_0 | A_1 | ...] along the output axis: x @ it = [x @ A_0 | x @ A_1 | ...]."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def shape(self) -> tuple[int, int]:
        return self.parts[0].shape[0], sum(p.shape[1] for p in self.parts)

    def __rmatmul__(self, x: Tensor) -> Tensor:
        return torch.cat([x @ p for p in self.parts], -1)


class RowConcat:
    """[A_0; A_1; ...] along the input axis: x @ it = sum_i x[..., rows_i] @ A_i, summed in float32."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    def __rmatmul__(self, x: Tensor) -> Tensor:
        out, k0 = None, 0
        for p in self.parts:
            xs = x[..., k0:k0 + p.shape[0]]
            y = p.matmul_f32(xs) if isinstance(p, QuantizedMatrix) else xs.float() @ p.float()
            out = y if out is None else out.add_(y)
            k0 += p.shape[0]
        return out.to(x.dtype)
