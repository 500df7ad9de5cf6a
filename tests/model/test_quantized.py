"""model.quantized: x @ (int8 codes x scales) block by block equals x @ the dequantised matrix."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from grok_deploy.model import quantized
from grok_deploy.model.quantized import ColumnConcat, QuantizedMatrix, RowConcat, columns, over_array


def codes_and_scales(k, n, blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    s = (torch.rand(blocks, n, generator=g) * 1e-2 + 1e-3).to(torch.bfloat16).float()  # bf16 scales, as released
    w = q.float().view(blocks, k // blocks, n).mul(s[:, None, :]).view(k, n)  # the exact dequantised matrix
    return q, s, w


@pytest.mark.parametrize("blocks", [1, 8])
@pytest.mark.parametrize("block_bytes", [4 * 30 * 64, 1 << 20])  # 30 rows (spanning scale blocks) or all
def test_float32_product_equals_the_dequantised_matrix(monkeypatch, blocks, block_bytes):
    monkeypatch.setattr(quantized, "BLOCK_BYTES", block_bytes)
    q, s, w = codes_and_scales(344, 64, blocks)
    m = QuantizedMatrix(q, s)
    assert m.shape == (344, 64)
    assert torch.equal(m.dequantize(), w)  # q x s rounded once, as xai.dequantize
    x = torch.randn(3, 5, 344)  # leading dims kept
    got, ref = x @ m, x @ w
    assert got.shape == (3, 5, 64) and got.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_bfloat16_product_is_bit_identical_to_the_bf16_matmul(monkeypatch):
    monkeypatch.setattr(quantized, "BLOCK_BYTES", 4 * 30 * 64)
    q, s, w = codes_and_scales(344, 64, 8, seed=1)
    m = QuantizedMatrix(q, s, dtype=torch.bfloat16)
    x = torch.randn(7, 344).to(torch.bfloat16)
    assert torch.equal(m.dequantize(), w.to(torch.bfloat16))
    got = x @ m
    assert got.dtype == torch.bfloat16 and torch.equal(got, x @ w.to(torch.bfloat16))


def test_column_and_row_concat_assemble_the_sliced_matrix():
    q, s, w = codes_and_scales(96, 80, 1, seed=2)
    x = torch.randn(4, 96)
    halves = [QuantizedMatrix(q[:, :40], s[:, :40]), QuantizedMatrix(q[:, 40:], s[:, 40:])]
    cc = ColumnConcat(halves)
    assert cc.shape == (96, 80)
    assert torch.allclose(x @ cc, x @ w, rtol=0, atol=1e-5)
    rows = [QuantizedMatrix(q[:32], s), QuantizedMatrix(q[32:], s)]
    rc = RowConcat(rows)
    assert rc.shape == (96, 80)
    assert torch.allclose(x @ rc, x @ w, rtol=0, atol=1e-5)
    assert torch.allclose(x @ RowConcat([w[:32], w[32:]]), x @ w, rtol=0, atol=1e-5)  # float parts too
    qm = QuantizedMatrix(q, s)
    assert torch.equal(columns(qm, 10, 30).dequantize(), w[:, 10:30])
    assert torch.equal(columns(w, 10, 30), w[:, 10:30])


def test_codes_over_a_read_only_memory_map(tmp_path):
    q, s, w = codes_and_scales(64, 48, 1, seed=3)
    path = tmp_path / "codes.bin"
    q.numpy().tofile(path)
    mm = np.memmap(path, dtype=np.int8, mode="r", shape=(64, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable" warning escapes
        m = QuantizedMatrix(over_array(mm), s)
        x = torch.randn(2, 64)
        assert torch.allclose(x @ m, x @ w, rtol=0, atol=1e-5)


def test_shapes_that_do_not_fit_are_refused():
    q, s, _ = codes_and_scales(64, 48, 1)
    with pytest.raises(ValueError, match="do not fit"):
        QuantizedMatrix(q, torch.ones(3, 48))  # 64 rows do not split into 3 scale blocks
    with pytest.raises(ValueError, match="inner sizes differ"):
        torch.randn(2, 63) @ QuantizedMatrix(q, s)
