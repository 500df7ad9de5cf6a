"""Each piece of the reference math against an independent small computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig
from grok_deploy.model.generate import generate, nucleus_filter, sample
from grok_deploy.model.grok import (
    Grok,
    attention_core,
    bf16_const,
    expert_ffn,
    gelu_tanh,
    moe_sparse,
    rms_norm,
    rope,
    rope_tables,
    router_top2,
)


def random_params(cfg: GrokConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for p in names.flatten_order(cfg.num_layers):
        shape = names.leaf_shape(cfg, p)
        scale = 1.0 if p.endswith("scale") else (0.05 if p == names.EMBEDDING else 1.5 / math.sqrt(shape[-2]))
        base = 1.0 if p.endswith("scale") else 0.0
        out[p] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def rand_model():
    cfg = GrokConfig.from_name("grok-1-tiny", num_layers=3)
    m = Grok(cfg)
    m.load_params(random_params(cfg))
    return m


def test_rms_norm_multiplies_weight_directly():
    x = torch.tensor([[3.0, -4.0]])
    w = torch.tensor([2.0, 0.5])
    rms = math.sqrt((9 + 16) / 2 + 1e-5)
    assert torch.allclose(rms_norm(x, w, 1e-5), torch.tensor([[2 * 3 / rms, 0.5 * -4 / rms]]))


def test_rope_is_half_split_over_whole_head():
    dk, base, pos = 8, 10000.0, 5
    x = torch.randn(1, 1, 1, dk)
    cos, sin = rope_tables(torch.tensor([[pos]]), dk, base)
    got = rope(x, cos, sin)[0, 0, 0]
    expected = torch.empty(dk)
    for i in range(dk // 2):  # pair (i, i + dk/2) rotated by pos * base^(-2i/dk)
        phi = pos * base ** (-2 * i / dk)
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + dk // 2]
        expected[i] = a * math.cos(phi) - b * math.sin(phi)
        expected[i + dk // 2] = b * math.cos(phi) + a * math.sin(phi)
    assert torch.allclose(got, expected, atol=1e-5)


def test_gqa_query_head_j_uses_kv_head_j_div_g():
    b, t, hq, hkv, dk = 1, 3, 6, 2, 4
    g = hq // hkv
    q = torch.randn(b, t, hq, dk)
    k, v = torch.randn(b, t, hkv, dk), torch.randn(b, t, hkv, dk)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))[None]
    out = attention_core(q, k, v, mask, 0.5, 30.0).view(b, t, hq, dk)
    for j in range(hq):
        kv = j // g  # contiguous groups, not j % hkv
        s = (q[0, :, j] @ k[0, :, kv].T) * 0.5
        s = 30 * torch.tanh(s / 30)
        s = s.masked_fill(~mask[0], -1e30)
        assert torch.allclose(out[0, :, j], torch.softmax(s, -1) @ v[0, :, kv], atol=1e-5), j


def test_soft_cap_applies_after_scale_before_mask():
    q = torch.full((1, 1, 1, 2), 10.0)
    k = torch.tensor([[[[4.0, 4.0]], [[3.0, 3.0]]]])  # (1, 2, 1, 2)
    v = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    out = attention_core(q, k, v, mask, 0.5, 30.0)[0, 0]
    s = torch.tensor([80.0 * 0.5, 60.0 * 0.5])  # scaled logits 40 and 30
    p = torch.softmax(30 * torch.tanh(s / 30), -1)
    assert torch.allclose(out, p, atol=1e-6)
    assert not torch.allclose(out, torch.softmax(s, -1), atol=1e-4)  # the cap changes the result


def test_gelu_is_tanh_form():
    u = torch.linspace(-6, 6, 101)
    expected = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    assert torch.allclose(gelu_tanh(u), expected, atol=1e-6)
    erf = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    assert (gelu_tanh(u) - erf).abs().max() > 1e-4  # not the exact-erf GELU


def test_router_gates_are_not_renormalised():
    x = torch.randn(5, 4)
    w = torch.randn(4, 8)
    gates, idx = router_top2(x, w, 2)
    probs = torch.softmax(x @ w, -1)
    for n in range(5):
        order = sorted(range(8), key=lambda e: -probs[n, e])[:2]
        assert idx[n].tolist() == order
        assert torch.allclose(gates[n], probs[n, order])
    assert (gates.sum(-1) < 1).all()


def test_moe_sparse_equals_dense_reference_and_runs_two_experts_per_token():
    torch.manual_seed(0)
    n, d, f, e = 7, 6, 5, 8
    x, wr = torch.randn(n, d), torch.randn(d, e)
    w, v, o = torch.randn(e, d, f), torch.randn(e, d, f), torch.randn(e, f, d)
    probs = torch.softmax(x @ wr, -1)
    dense = torch.zeros(n, d)
    for t in range(n):
        for ex in torch.topk(probs[t], 2).indices.tolist():
            y = ((x[t] @ v[ex]) * gelu_tanh(x[t] @ w[ex])) @ o[ex]
            dense[t] += probs[t, ex] * y
    assert torch.allclose(moe_sparse(x, wr, w, v, o, 2), dense, atol=1e-4)
    # expert-parallel halves add up to the whole
    half0 = moe_sparse(x, wr, w[:4], v[:4], o[:4], 2, experts=range(0, 4))
    half1 = moe_sparse(x, wr, w[4:], v[4:], o[4:], 2, experts=range(4, 8))
    assert torch.allclose(half0 + half1, dense, atol=1e-4)
    assert torch.allclose(expert_ffn(x, w[0], v[0], o[0])[0], ((x[0] @ v[0]) * gelu_tanh(x[0] @ w[0])) @ o[0])


def test_multipliers_are_rounded_to_bf16_as_the_original():
    assert bf16_const(78.38367176906169) == 78.5
    assert bf16_const(0.5773502691896257) == 0.578125


@pytest.mark.parametrize("length", [1, 5, 17])
def test_incremental_decoding_equals_full_forward(rand_model, length):
    prompt = list(range(4, 4 + length))
    res = generate(rand_model, [prompt], 6, return_logits=True)
    seq = prompt + res.output_ids[0][:-1]
    full = rand_model(torch.tensor([seq]))[0, length - 1:]
    assert full.shape == (6, rand_model.cfg.vocab_size)
    assert (full - torch.from_numpy(res.logits[0])).abs().max() < 1e-4


def test_batch_of_different_lengths_matches_single_runs(rand_model):
    prompts = [[5, 6, 7], list(range(10, 22)), [40, 41, 42, 43, 44, 45, 46]]
    batched = generate(rand_model, prompts, 8, return_logits=True)
    for i, p in enumerate(prompts):
        alone = generate(rand_model, [p], 8, return_logits=True)
        assert batched.output_ids[i] == alone.output_ids[0]
        assert np.abs(batched.logits[i] - alone.logits[0]).max() < 1e-4
        seq = p + batched.output_ids[i][:-1]
        full = rand_model(torch.tensor([seq]))[0, len(p) - 1:].numpy()
        assert np.abs(full - batched.logits[i]).max() < 1e-4


def test_pad_keys_are_masked(rand_model):
    """A pad (id 0) inside the context is invisible, as the original's `tokens > 0` mask."""
    a = rand_model(torch.tensor([[5, 6, 0, 7]]))[0, -1]
    b = rand_model(torch.tensor([[5, 6, 9, 7]]))[0, -1]
    assert not torch.allclose(a, b)
    # with the pad masked, position 3 sees only 5, 6 and itself; RoPE phases of 5, 6 and 7 unchanged
    cache = rand_model.new_cache(1, 8)
    rand_model(torch.tensor([[5, 6, 0]]), cache=cache, start=torch.tensor([0]))
    c = rand_model(torch.tensor([[7]]), cache=cache, start=torch.tensor([3]))[0, -1]
    assert torch.allclose(a, c, atol=1e-4)


def test_bfloat16_compute_tracks_float32(rand_model):
    cfg = rand_model.cfg
    mb = Grok(cfg, torch.bfloat16)
    mb.load_params(random_params(cfg))
    tokens = torch.tensor([list(range(30, 50))])
    l32, l16 = rand_model(tokens)[0], mb(tokens)[0]
    assert mb.layers[0].wq.dtype == torch.bfloat16 and mb.layers[0].router.dtype == torch.float32
    rel = (l32 - l16).abs().max() / l32.abs().max()
    assert 0 < rel < 0.1


def test_nucleus_filter_matches_original_rule():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    p = 0.8
    asc = sorted(logits[0].tolist())
    probs = torch.softmax(torch.tensor(asc), -1).cumsum(-1)
    first = next(i for i, c in enumerate(probs.tolist()) if c >= 1 - p)
    keep = [x >= asc[first] for x in logits[0].tolist()]
    out = nucleus_filter(logits, p)[0]
    assert [bool(v > -1e9) for v in out] == keep
    assert torch.equal(nucleus_filter(logits, 1.0), logits)


def test_sampling_is_seeded_and_greedy_at_zero_temperature():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, 0.0, 1.0, None), logits.argmax(-1))
    a = sample(logits, 1.0, 0.9, torch.Generator().manual_seed(3))
    b = sample(logits, 1.0, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_config_derived_sizes_and_errors():
    assert GrokConfig.from_name("grok-1").ffn_size == 32768
    assert GrokConfig.from_name("grok-1-tiny").ffn_size == 344
    assert GrokConfig.from_name("grok-1-bench").ffn_size == 5464
    assert GrokConfig.from_name("grok-1").param_count() == 315_684_820_992
    from grok_deploy.errors import UserError
    with pytest.raises(UserError, match="known presets: grok-1, grok-1-bench, grok-1-smoke, grok-1-tiny"):
        GrokConfig.from_name("grok-2")
    with pytest.raises(UserError, match="num_q_heads 12 is not divisible by num_kv_heads 8"):
        GrokConfig.from_name("grok-1-tiny", num_q_heads=12)


def test_flatten_order_is_string_sorted():
    order = names.flatten_order(64)
    assert order[0] == names.EMBEDDING and order[1] == names.FINAL_NORM
    assert order.index(names.layer_path(10, "moe/linear/w")) == 26
    assert order.index(names.layer_path(2, "moe/linear/w")) == 146
    assert order.index(names.layer_path(63, "router/w")) == 722 + 11
    assert len(order) == 770
