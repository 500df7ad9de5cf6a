"""Reference Grok-1 in PyTorch: the exact math of xai-org/grok-1 (grok1-model.md), nothing else.

No files, no parallelism, no serving. Weights come in through `load_params` in the canonical
(official Haiku) layout: matrices [in, out], experts stacked on axis 0.

Numerics:
- float32: everything in f32 (int8 x scale dequantised exactly by the reader).
- bfloat16: the original's casts: bf16 weights and activations; f32 norms, RoPE, attention
  logits, softmax and router; probabilities, gates and RoPE results cast back to bf16.
The embedding and output multipliers are exact in float32 and rounded to bf16 (78.5, 0.578125)
in bfloat16 only, as the original (a weakly typed Python float times a bf16 array stays bf16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig

NEG_INF = -1e30  # the original's mask value (a select, not an additive bias)


def bf16_const(x: float) -> float:
    """A Python float rounded to bf16, as JAX does when it multiplies a bf16 array by it."""
    return float(torch.tensor(x, dtype=torch.bfloat16))


def multipliers(cfg: GrokConfig, dtype: torch.dtype) -> tuple[float, float]:
    """(embedding, output) multipliers as the original applies them in `dtype`: exact in float32,
    rounded to bf16 in bfloat16 (78.5 and 0.578125 for Grok-1)."""
    if dtype == torch.bfloat16:
        return bf16_const(cfg.embedding_multiplier), bf16_const(cfg.output_multiplier)
    return cfg.embedding_multiplier, cfg.output_multiplier


# --- building blocks (pure functions, reused by the sharded runner and the ONNX graph) ----------

def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """w * x / rms(x), in f32 inside, result in x's dtype. No (1 + w), no mean subtraction."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (w.float() * y).to(x.dtype)


def rope_tables(positions: Tensor, dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape positions.shape + (dim,), half-split layout [phi, phi], in f32."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    phase = positions.float()[..., None] * inv_freq  # (..., dim/2)
    phase = torch.cat([phase, phase], dim=-1)
    return phase.cos(), phase.sin()


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half ("NeoX") RoPE over the whole head. x (B, T, H, dk); cos/sin (B, T, dk)."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def attention_core(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, cap: float) -> Tensor:
    """Grouped-query attention with the soft-cap.

    q (B, T, Hq, dk); k, v (B, S, Hkv, dk); mask (B, T, S) bool. Query head j uses KV head
    j // (Hq / Hkv) (contiguous groups). Returns (B, T, Hq * dk) in q's dtype.
    """
    b, t, hq, dk = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, dk)
    # logits formed in the compute dtype, then f32: (B, Hkv, G, T, S)
    s = torch.einsum("btkgd,bskd->bkgts", qg, k).float()
    s = s * scale
    s = cap * torch.tanh(s / cap)  # soft-cap after scaling, before masking
    s = torch.where(mask[:, None, None], s, torch.full_like(s, NEG_INF))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    o = torch.einsum("bkgts,bskd->btkgd", p, v)  # head j = kv * G + g
    return o.reshape(b, t, hq * dk)


def gelu_tanh(u: Tensor) -> Tensor:
    """jax.nn.gelu(approximate=True): 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
    return F.gelu(u, approximate="tanh")


def router_top2(x: Tensor, w_router: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """f32 router: softmax over all experts, then top-k. Gates are NOT renormalised (sum < 1).

    x (N, D), w_router (D, E). Returns gates (N, k) f32 and expert indices (N, k).
    """
    probs = torch.softmax(x.float() @ w_router.float(), dim=-1)
    return torch.topk(probs, k, dim=-1)


def expert_ffn(x: Tensor, w: Tensor, v: Tensor, o: Tensor) -> Tensor:
    """One expert: ((x V) * gelu_tanh(x W)) O. x (N, D); w, v (D, F); o (F, D)."""
    return ((x @ v) * gelu_tanh(x @ w)) @ o


def moe_sparse(x: Tensor, w_router: Tensor, w: Tensor, v: Tensor, o: Tensor, k: int,
               experts: range | None = None) -> Tensor:
    """Sparse MoE: each token runs only its k chosen experts.

    x (N, D); w, v (E_local, D, F); o (E_local, F, D). `experts` are the global ids held in
    w/v/o (all by default); tokens routed elsewhere contribute nothing here, which is how an
    expert-parallel rank computes its partial sum.
    """
    experts = experts if experts is not None else range(w.shape[0])
    first = experts[0] if len(experts) else 0
    return moe_streamed(x, w_router, lambda e: (w[e - first], v[e - first], o[e - first]), k, experts)


def moe_streamed(x: Tensor, w_router: Tensor, get_expert, k: int, experts) -> Tensor:
    """moe_sparse with each expert's matrices fetched by `get_expert(e) -> (w, v, o)` only when a
    token is routed to it, and dropped after use: one expert's weights live at a time.

    x (N, D); w, v (D, F); o (F, D); `experts` are the global ids to run (contiguous).
    """
    gates, idx = router_top2(x, w_router, k)
    gates = gates.to(x.dtype)  # gates cast to the compute dtype when mixing, as the original
    out = torch.zeros_like(x)
    for e in experts:
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        if token.numel() == 0:
            continue
        w, v, o = get_expert(e)
        y = expert_ffn(x[token], w, v, o)
        del w, v, o
        out.index_add_(0, token, y * gates[token, slot, None])
    return out


def decoder_layer(c: GrokConfig, h: Tensor, lw, cos: Tensor, sin: Tensor, mask: Tensor,
                  kv=None, attn_rows: int | None = None, taps: dict | None = None) -> Tensor:
    """One decoder layer on h (B, T, D) in the compute dtype; returns the new h.

    `lw` holds the layer's weights: attributes wq, wk, wv, wo, norm0..norm3, router and
    `expert(e) -> (w, v, o)` (fetched one expert at a time). `kv(k, v) -> (k, v)` lets a KV cache
    store this step's keys and values and return the whole memory. `attn_rows`: attention per
    sequence, in blocks of that many queries, to bound the (Hq, T, S) scores of long inputs.
    `taps`, if given, receives the branch outputs before their norms: "attention" (a Wo) and
    "moe", both (B, T, D), for a layer-by-layer comparison.
    """
    b, t, _ = h.shape
    x = rms_norm(h, lw.norm0, c.norm_eps)
    q = rope((x @ lw.wq).view(b, t, c.num_q_heads, c.key_size), cos, sin)
    k = rope((x @ lw.wk).view(b, t, c.num_kv_heads, c.key_size), cos, sin)
    v = (x @ lw.wv).view(b, t, c.num_kv_heads, c.key_size)
    if kv is not None:
        k, v = kv(k, v)
    if attn_rows is None:
        a = attention_core(q, k, v, mask, c.attn_scale, c.max_attn_value)
    else:  # (B, T, Hq dk) built from blocks of (1, rows) queries
        a = torch.cat([torch.cat([attention_core(q[i:i + 1, lo:lo + attn_rows], k[i:i + 1], v[i:i + 1],
                                                 mask[i:i + 1, lo:lo + attn_rows], c.attn_scale, c.max_attn_value)
                                  for lo in range(0, t, attn_rows)], dim=1) for i in range(b)], dim=0)
    a = a @ lw.wo
    h = h + rms_norm(a, lw.norm1, c.norm_eps)
    x = rms_norm(h, lw.norm2, c.norm_eps).reshape(b * t, c.emb_size)
    m = moe_streamed(x, lw.router, lw.expert, c.num_selected_experts, range(c.num_experts)).view(b, t, c.emb_size)
    if taps is not None:
        taps.update(attention=a, moe=m)
    return h + rms_norm(m, lw.norm3, c.norm_eps)


# --- KV cache ----------------------------------------------------------------------------------

@dataclass
class KVCache:
    """Per-layer K and V, (B, S, Hkv, dk), and which positions hold a real (non-pad) token."""

    k: list[Tensor]
    v: list[Tensor]
    valid: Tensor  # (B, S) bool

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


# --- the model ----------------------------------------------------------------------------------

class Layer(nn.Module):
    def __init__(self, cfg: GrokConfig, dtype: torch.dtype):
        super().__init__()
        d, e, f = cfg.emb_size, cfg.num_experts, cfg.ffn_size

        def p(*shape: int, dt: torch.dtype = dtype) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dt), requires_grad=False)

        self.wq, self.wk, self.wv = p(d, cfg.q_size), p(d, cfg.kv_size), p(d, cfg.kv_size)
        self.wo = p(cfg.q_size, d)
        self.norm0, self.norm1, self.norm2, self.norm3 = (p(d, dt=torch.float32) for _ in range(4))
        self.router = p(d, e, dt=torch.float32)
        self.w_gate, self.w_up, self.w_down = p(e, d, f), p(e, d, f), p(e, f, d)

    def expert(self, e: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.w_gate[e], self.w_up[e], self.w_down[e]


# canonical leaf name -> Layer attribute
LEAF_TO_ATTR = {
    "multi_head_attention/query/w": "wq",
    "multi_head_attention/key/w": "wk",
    "multi_head_attention/value/w": "wv",
    "multi_head_attention/linear/w": "wo",
    "rms_norm/scale": "norm0",
    "rms_norm_1/scale": "norm1",
    "rms_norm_2/scale": "norm2",
    "rms_norm_3/scale": "norm3",
    "router/w": "router",
    "moe/linear/w": "w_gate",
    "moe/linear_v/w": "w_up",
    "moe/linear_1/w": "w_down",
}


class Grok(nn.Module):
    """Grok-1 decoder. forward(tokens, cache, start) -> f32 logits (B, T, V)."""

    def __init__(self, cfg: GrokConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embedding = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.emb_size), requires_grad=False)  # f32
        self.final_norm = nn.Parameter(torch.zeros(cfg.emb_size), requires_grad=False)
        self.layers = nn.ModuleList(Layer(cfg, dtype) for _ in range(cfg.num_layers))
        self.emb_mult, self.out_mult = multipliers(cfg, dtype)

    @torch.no_grad()
    def load_params(self, params: Mapping[str, object]) -> None:
        """Copy canonical-layout weights in (numpy or torch, any float dtype); every leaf required."""
        seen = set()
        for name, value in params.items():
            t = torch.as_tensor(value)
            if name == names.EMBEDDING:
                target = self.embedding
            elif name == names.FINAL_NORM:
                target = self.final_norm
            else:
                layer, leaf = names.split_layer_path(name)
                target = getattr(self.layers[layer], LEAF_TO_ATTR[leaf])
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(target.shape)}")
            target.copy_(t.to(target.dtype))
            seen.add(name)
        missing = set(names.flatten_order(self.cfg.num_layers)) - seen
        if missing:
            raise ValueError(f"missing weights: {sorted(missing)[:5]} ...")

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        shape = (batch, max_len, c.num_kv_heads, c.key_size)
        return KVCache(k=[torch.zeros(shape, dtype=self.dtype) for _ in range(c.num_layers)],
                       v=[torch.zeros(shape, dtype=self.dtype) for _ in range(c.num_layers)],
                       valid=torch.zeros(batch, max_len, dtype=torch.bool))

    def embed(self, tokens: Tensor) -> Tensor:
        return self.embedding[tokens].to(self.dtype) * self.emb_mult  # (B, T, D)

    def unembed(self, h: Tensor) -> Tensor:
        h = rms_norm(h, self.final_norm, self.cfg.norm_eps)
        logits = (h @ self.embedding.to(self.dtype).T) * self.out_mult
        return logits.float()  # (B, T, V)

    def attention_mask(self, tokens: Tensor, cache: KVCache | None, start: Tensor) -> tuple[Tensor, Tensor]:
        """Positions (B, T) and mask (B, T, S): causal x key is a real token (not pad)."""
        b, t = tokens.shape
        positions = start[:, None] + torch.arange(t)  # (B, T)
        if cache is None:
            key_pos = positions
            key_valid = tokens != self.cfg.pad_id
        else:
            key_pos = torch.arange(cache.max_len).expand(b, -1)
            key_valid = cache.valid
        mask = (key_pos[:, None, :] <= positions[:, :, None]) & key_valid[:, None, :]
        return positions, mask

    def forward(self, tokens: Tensor, cache: KVCache | None = None, start: Tensor | None = None) -> Tensor:
        """tokens (B, T) int64 at positions start[b] + t. With a cache, K/V are written there."""
        c = self.cfg
        b, t = tokens.shape
        start = torch.zeros(b, dtype=torch.long) if start is None else start.long()
        if cache is not None:
            rows = torch.arange(b)[:, None]
            slots = start[:, None] + torch.arange(t)  # (B, T)
            cache.valid[rows, slots] = tokens != c.pad_id
        positions, mask = self.attention_mask(tokens, cache, start)
        cos, sin = rope_tables(positions, c.key_size, c.rope_base)
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            kv = None
            if cache is not None:
                def kv(k, v, i=i):
                    cache.k[i][rows, slots] = k
                    cache.v[i][rows, slots] = v
                    return cache.k[i], cache.v[i]
            h = decoder_layer(c, h, layer, cos, sin, mask, kv)
        return self.unembed(h)
