"""Pure sharding functions, on arange weights so every expected slice is exact."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from grok_deploy.model.config import GrokConfig
from grok_deploy.trtllm import shard
from grok_deploy.trtllm.shard import Mapping


def test_split_columns_and_rows_numpy_and_torch():
    w = np.arange(4 * 8).reshape(4, 8)
    assert shard.split_columns(w, 1, 4).tolist() == [[2, 3], [10, 11], [18, 19], [26, 27]]
    assert shard.split_rows(w, 1, 2).tolist() == w[2:4].tolist()
    t = torch.arange(2 * 4 * 8).reshape(2, 4, 8)
    assert torch.equal(shard.split_columns(t, 3, 4), t[:, :, 6:8])
    assert torch.equal(shard.split_rows(t, 0, 4), t[:, 0:1])
    assert torch.equal(shard.split_experts(t, 1, 2), t[1:2])


def test_split_rejects_uneven_and_bad_rank():
    with pytest.raises(ValueError, match="does not split"):
        shard.split_columns(np.zeros((2, 10)), 0, 4)
    with pytest.raises(ValueError, match="outside"):
        shard.split_columns(np.zeros((2, 8)), 4, 4)


def test_fuse_qkv_per_rank():
    d, hq, hkv = 2, 8, 4  # q 8 columns, k/v 4 columns
    q = np.arange(d * hq).reshape(d, hq)
    k = 100 + np.arange(d * hkv).reshape(d, hkv)
    v = 200 + np.arange(d * hkv).reshape(d, hkv)
    fused = shard.fuse_qkv(q, k, v, 1, 2)
    assert fused.tolist() == [[4, 5, 6, 7, 102, 103, 202, 203], [12, 13, 14, 15, 106, 107, 206, 207]]
    # scales [1, N] go the same way; torch as well
    qs, ks, vs = (torch.arange(n)[None] + off for n, off in ((hq, 0), (hkv, 100), (hkv, 200)))
    assert shard.fuse_qkv(qs, ks, vs, 0, 4)[0].tolist() == [0, 1, 100, 200]
    # every rank together holds every column exactly once
    ranks = [shard.fuse_qkv(q, k, v, r, 4) for r in range(4)]
    assert sorted(np.concatenate(ranks, -1).ravel().tolist()) == sorted(
        np.concatenate([q, k, v], -1).ravel().tolist())


def test_fuse_fc_is_linear_v_then_linear():
    e, d, f = 2, 3, 4
    lin = np.arange(e * d * f).reshape(e, d, f)  # gate branch (GELU)
    lin_v = 1000 + lin                          # linear branch
    fc = shard.fuse_fc(lin_v, lin, 1, 2)
    assert fc.shape == (e, d, 4)
    assert np.array_equal(fc[..., :2], lin_v[..., 2:4])
    assert np.array_equal(fc[..., 2:], lin[..., 2:4])


@pytest.mark.parametrize("world,expected", [
    (8, [0, 1, 2, 3, 4, 5, 6, 7]), (16, [r // 2 for r in range(16)]),
    (4, [None] * 4), (2, [None] * 2), (1, [None]),
])
def test_block_of_slice(world, expected):
    assert [shard.block_of_slice(32768, 8, r, world) for r in range(world)] == expected


def test_dequantize_rows_uses_each_rows_block():
    k, n = 16, 3  # 8 blocks of 2 rows
    q = np.arange(k * n, dtype=np.int64).reshape(k, n).astype(np.int8)
    scales = (np.arange(8 * n).reshape(8, n) + 1).astype(ml_dtypes.bfloat16)
    full = q.astype(np.float32) * np.repeat(scales.astype(np.float32), 2, axis=0)
    for lo, hi in ((0, 16), (4, 8), (3, 9), (15, 16)):
        assert np.array_equal(shard.dequantize_rows(q[lo:hi], scales, lo, k), full[lo:hi])
    # stacked experts
    qe = np.stack([q, -q])
    se = np.stack([scales, scales])
    assert np.array_equal(shard.dequantize_rows(qe[:, 4:12], se, 4, k)[1], -full[4:12])


def test_requantize_rounds_scale_before_quantising():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 5)).astype(np.float32)
    w[:, 4] = 0.0  # an all-zero column
    q, s, err = shard.requantize(w, ml_dtypes.bfloat16)
    assert q.dtype == np.int8 and s.dtype == ml_dtypes.bfloat16 and s.shape == (5,)
    s32 = s.astype(np.float32)
    expected_s = (np.abs(w).max(0) / 127).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(s32, expected_s)
    safe = np.where(s32 > 0, s32, 1)
    assert np.array_equal(q, np.clip(np.rint(w / safe), -127, 127).astype(np.int8))
    assert np.abs(q).max() <= 127 and np.all(q[:, 4] == 0) and s32[4] == 0
    deq = q.astype(np.float32) * s32
    assert err == pytest.approx(float(np.abs(w - deq).max()))
    # bf16 rounding of the scale can make |w|/s exceed 127 by a little: the clamp keeps int8 range,
    # and the error stays about half a step
    assert np.all(np.abs(w - deq) <= s32 * 0.5 + np.abs(w) * 2 ** -8 + 1e-7)


def test_requantize_is_exact_for_integer_columns():
    w = (np.arange(-127, 128, dtype=np.float32)[:, None] * np.array([[1.0, 0.5]], np.float32))
    q, s, err = shard.requantize(w, np.float32)
    assert err == 0.0 and s.tolist() == [1.0, 0.5]
    assert np.array_equal(q[:, 0], np.arange(-127, 128))


def test_mapping_matches_tensorrt_llm():
    m = Mapping(tp=8, pp=2, moe_ep=2)
    assert (m.moe_tp, m.moe_ep, m.world) == (4, 2, 16)
    # rank = pp_rank * tp + tp_rank; moe_tp_rank = tp_rank // ep; moe_ep_rank = tp_rank % ep
    assert [(m.pp_rank(r), m.tp_rank(r)) for r in (0, 7, 8, 15)] == [(0, 0), (0, 7), (1, 0), (1, 7)]
    assert [m.moe_tp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [m.moe_ep_rank(r) for r in range(8)] == [0, 1] * 4
    assert list(m.experts(3, 8)) == [4, 5, 6, 7]
    assert list(m.layers(9, 12)) == list(range(6, 12))
    assert Mapping.from_dict(m.to_dict()).to_dict() == m.to_dict()
    assert Mapping(4).to_dict() == {"world_size": 4, "tp_size": 4, "pp_size": 1, "moe_tp_size": 4, "moe_ep_size": 1}


def test_mapping_problems_name_the_values():
    tiny = GrokConfig.from_name("grok-1-tiny")
    assert Mapping(8).problems(tiny) == []  # ffn 344 = 8 x 43: moe_tp 8 works
    assert Mapping(8, moe_tp=4, moe_ep=2).problems(tiny) == []
    assert any("--tp 16 does not divide the kv heads (8)" in p for p in Mapping(16).problems(tiny))
    assert any("--moe-tp 3 x --moe-ep 2 must equal --tp 8" in p for p in Mapping(8, moe_tp=3, moe_ep=2).problems(tiny))
    assert any("--pp 5 does not divide the layers (12)" in p for p in Mapping(1, pp=5).problems(tiny))
