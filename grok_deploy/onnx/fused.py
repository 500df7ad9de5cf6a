"""The decoder on ONNX Runtime's fused LLM operators (`export-onnx --graph fused`, the default).

Same graph I/O, weights and initializer names as `graph.DecoderBuilder` (the `standard` graph);
what changes is how a layer is computed:

- attention is one `com.microsoft.GroupQueryAttention` per layer on the packed q|k|v projection
  (B, T, (Hq + 2 Hkv) dk): `scale` = 1/sqrt(dk) (cfg.attn_scale), `softcap` 30 (the kernel applies
  cap * tanh(s / cap) after scaling and before the mask, as the original), `do_rotary` 1 with
  rotate-half (`rotary_interleaved` 0) over the whole head from cos/sin caches (sequence_len, dk/2)
  built exactly as `rope_tables`, `kv_num_heads` for the contiguous query groups. The caches are
  `past_key_values.N.*` in BNSH (B, Hkv, capacity, dk): bound as past and present they are one
  buffer and the kernel appends in place. Per row, seqlens_k = max(position_ids) (the kernel's
  "total length - 1") and total_sequence_length = max over the batch + 1; attention_mask becomes
  `attention_bias` (B, 1, T, L): 0 on real slots, -1e30 on pads, added after the soft-cap, so a
  pad gets probability 0 exactly as the reference's select.
- norms are `RMSNormalization` (opset 23) where the input is a branch output, and
  `com.microsoft.SkipSimplifiedLayerNormalization` where the residual add feeds the next norm
  (one kernel returns rms(h + branch) * w and the new h).
- the MoE keeps the sparse subgraph of DecoderBuilder: ONNX Runtime's CPU `MoE` / `QMoE` kernels
  do not implement Grok's expert. Measured on onnxruntime 1.32.0 (tests/onnx/test_fused_graph.py
  replays it): `activation_type="geglu"` (gelu_tanh(x W) * (x V)) is rejected on CPU ("Unsupported
  MoE activation type: geglu"; CUDA only), and a separate gated `fc3` is "not implemented for CPU
  MoE" (QMoE, 8-bit: "FC3 gating is not yet implemented on CPU for QMoE"); the only gated CPU
  activation is SwiGLU, x W * sigmoid(alpha x W), which is not the tanh-approximate GELU for any
  alpha. Routing would match (softmax over all experts, top-k, `normalize_routing_weights` 0), the
  expert would not. (A variant with 8 nodes per expert instead of 10, rows of the flattened top-k,
  measured 7% slower at int8 batch-1 decode on grok-1-bench than this subgraph, and was dropped.)
  The fused graph's MoE is that subgraph with its per-expert steps batched (`moe`): the (token,
  slot) pairs sorted by expert with one NonZero, one Gather of their rows, one Split by the
  experts' counts, then per expert only its two projections; the GELU gate, the value product and
  the gating run once on all rows, and one ScatterND with reduction "add" sums each token's k
  outputs. A layer's MoE is 41 nodes instead of 92: in ONNX Runtime's profile of the int8 batch-1
  decode on grok-1-bench, 784 nodes a step took 4.8 ms besides MatMulNBits before, 432 nodes 3.2 ms
  after (profiled times; unprofiled, the gain was inside the bench's noise). Each expert sees
  the same rows in the same order as in the standard graph, so its products are the same; the
  sum of a token's two terms does not depend on their order.
  Source read: microsoft/onnxruntime onnxruntime/contrib_ops/cpu/moe/moe_cpu.cc
  (commit 09fc631d9b3a5bbf7b24b99309845312385bf521) and the schemas of the installed 1.32.0.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from grok_deploy.model import names
from grok_deploy.onnx.graph import NEG_INF, DecoderBuilder

FUSED_OPSET = 23  # RMSNormalization
MS = "com.microsoft"


def rope_caches(cfg) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (sequence_len, dk/2) f32: phase = f32(pos) * base^(-2i/dk) in f32, as rope_tables."""
    inv_freq = (cfg.rope_base ** (-np.arange(0, cfg.key_size, 2, dtype=np.float32) / cfg.key_size)).astype(np.float32)
    phase = np.arange(cfg.sequence_len, dtype=np.float32)[:, None] * inv_freq[None]  # f32 product
    # cos/sin of the f32 phase, correctly rounded to f32 (via f64)
    return np.cos(phase.astype(np.float64)).astype(np.float32), np.sin(phase.astype(np.float64)).astype(np.float32)


class FusedDecoderBuilder(DecoderBuilder):
    """DecoderBuilder with GroupQueryAttention and fused RMS norms (module docstring)."""

    opset = FUSED_OPSET

    def rms_norm(self, x: str, name: str) -> str:
        w = self.weight(name, (self.cfg.emb_size,), lambda: self.src.read(name))
        return self.g.op("RMSNormalization", x, w, axis=-1, epsilon=self.cfg.norm_eps)

    def skip_norm(self, branch: str, h: str, name: str) -> tuple[str, str]:
        """(rms(h + branch) * w, h + branch) in one kernel."""
        w = self.weight(name, (self.cfg.emb_size,), lambda: self.src.read(name))
        y, _, _, h = self.g.op("SkipSimplifiedLayerNormalization", branch, h, w, n_out=4, domain=MS,
                               epsilon=self.cfg.norm_eps)
        return y, h

    def attention(self, i: int, x: str) -> str:
        g, c = self.g, self.cfg
        d = c.emb_size
        p = names.layer_path(i, "multi_head_attention/")

        def qkv():  # query, key and value side by side: (D, Hq*dk + 2*Hkv*dk)
            return np.concatenate([self.src.read(p + f"{n}/w") for n in ("query", "key", "value")], axis=1)

        packed = self.linear(x, p + "qkv/w", d, c.q_size + 2 * c.kv_size, qkv)
        o = g.op("GroupQueryAttention", packed, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                 self.seqlens, self.total, self.cos, self.sin, "position_ids", self.bias, n_out=3, domain=MS,
                 num_heads=c.num_q_heads, kv_num_heads=c.num_kv_heads, scale=float(c.attn_scale),
                 softcap=float(c.max_attn_value), do_rotary=1, rotary_interleaved=0)
        g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
        return self.linear(o[0], p + "linear/w", c.q_size, d, lambda: self.src.read(p + "linear/w"))

    def shared(self) -> None:
        """Per call: seqlens_k (B,) i32, total_sequence_length i32, attention_bias (B, 1, T, L)."""
        g = self.g
        last = g.op("ReduceMax", "position_ids", g.const([1]), keepdims=0)  # (B,) last position per row
        self.seqlens = g.op("Cast", last, to=TensorProto.INT32)
        used = g.op("Add", g.op("ReduceMax", "position_ids", keepdims=0), g.const(1))  # L = max position + 1
        self.total = g.op("Cast", used, to=TensorProto.INT32)
        real = g.op("Slice", "attention_mask", g.const([0]), g.op("Reshape", used, g.const([1])), g.const([1]))
        bias = g.op("Where", g.op("Cast", real, to=TensorProto.BOOL), g.const(0.0, np.float32),
                    g.const(NEG_INF, np.float32))  # (B, L)
        shape = g.op("Concat", g.op("Shape", "input_ids", end=1), g.const([1]), g.op("Shape", "input_ids", start=1),
                     g.op("Shape", bias, start=1), axis=0)  # (B, 1, T, L)
        self.bias = g.op("Expand", g.op("Unsqueeze", bias, g.const([1, 2])), shape)
        cos, sin = rope_caches(self.cfg)
        self.cos = self.weight("rope/cos_cache", cos.shape, lambda: cos)
        self.sin = self.weight("rope/sin_cache", sin.shape, lambda: sin)

    def moe(self, i: int, x: str) -> str:
        """x (N, D) -> (N, D): each token runs its k chosen experts only, batched (module docstring)."""
        g, c = self.g, self.cfg
        d, f, k, n_exp = c.emb_size, c.ffn_size, c.num_selected_experts, c.num_experts
        p = names.layer_path(i, "")
        gates, idx = self.route(i, x)  # (N, k)
        # (E, N k) one-hot of the pairs; NonZero lists them expert by expert, pairs in order
        hits = g.op("Equal", g.const(np.arange(n_exp).reshape(-1, 1)), g.op("Reshape", idx, g.const([1, -1])))
        pair = g.op("Gather", g.op("NonZero", hits), g.const(1), axis=0)  # (N k,) sorted by expert
        counts = g.op("ReduceSum", g.op("Cast", hits, to=TensorProto.INT64), g.const([1]), keepdims=0)  # (E,)
        token = g.op("Div", pair, g.const(k))
        rows = g.op("Split", g.op("Gather", x, token, axis=0), counts, n_out=n_exp, axis=0)
        wv = [self.linear(rows[e], f"{p}moe/expert_{e}/wv", d, 2 * f, self.expert_wv(i, e)) for e in range(n_exp)]
        a, b = g.op("Split", g.op("Concat", *wv, axis=0), g.const([f, f]), n_out=2, axis=-1)
        acts = g.op("Split", g.op("Mul", b, g.op("Gelu", a, approximate="tanh")), counts, n_out=n_exp, axis=0)
        ys = [self.linear(acts[e], f"{p}moe/expert_{e}/o", f, d,
                          lambda e=e: self.src.read_expert(p + "moe/linear_1/w", e)) for e in range(n_exp)]
        gate = g.op("Gather", g.op("Reshape", gates, g.const([-1, 1])), pair, axis=0)  # (N k, 1)
        zeros = g.op("ConstantOfShape", g.op("Shape", x), value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.0]))
        return g.op("ScatterND", zeros, g.op("Unsqueeze", token, g.const([-1])),
                    g.op("Mul", g.op("Concat", *ys, axis=0), gate), reduction="add")

    def layers(self, h: str, n_layers: int) -> str:
        c = self.cfg
        x = self.rms_norm(h, names.layer_path(0, "rms_norm/scale"))
        for i in range(n_layers):
            lp = names.layer_path(i, "")
            a = self.rms_norm(self.attention(i, x), lp + "rms_norm_1/scale")
            x, h = self.skip_norm(a, h, lp + "rms_norm_2/scale")  # h += rms(a); x = rms(h) w2
            flat = self.g.op("Reshape", x, self.g.const([-1, c.emb_size]))
            m = self.rms_norm(self.g.op("Reshape", self.moe(i, flat), self.g.op("Shape", h)), lp + "rms_norm_3/scale")
            nxt = names.layer_path(i + 1, "rms_norm/scale") if i + 1 < n_layers else names.FINAL_NORM
            x, h = self.skip_norm(m, h, nxt)  # h += rms(m); x = the next layer's input norm (or the final)
        return x
