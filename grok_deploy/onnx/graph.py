"""The Grok-1 decoder as an ONNX graph, built node by node with onnx.helper.

Graph I/O (dynamic batch, seq and past; N = layer):
- `input_ids` int64 (batch, seq); `position_ids` int64 (batch, seq): each token's position, which
  is also the cache slot its K/V is written to;
- `attention_mask` int64 (batch, past): 1 where a cache slot holds a real (non-pad) token, this
  call's tokens included;
- `past_key_values.N.key|value` f32 (batch, kv_heads, past, head): fixed-capacity caches;
- `logits` f32 (batch, seq, vocab);
- `present.N.key|value` f32 (batch, kv_heads, past, head): the past with this call's K/V
  scattered in at `position_ids`. Bind the same buffer as past and present (IOBinding) and the
  cache is updated in place: no step copies it whole.
Attention reads slots [0, max(position_ids)] only; query t sees slot s iff s <= position[t] and
attention_mask[s] = 1 (the reference's causal x not-pad select).

The MoE is sparse and exact: f32 router softmax over 8, TopK 2, raw (not renormalised) gates;
per expert, NonZero picks its (token, slot) pairs, Gather -> ((x V) * gelu_tanh(x W)) O; a
ScatterND places every output at its (token, slot), then gates multiply and the k slots are
summed (two terms: the same sum as `model.moe_sparse`). Experts without tokens run on zero rows.

Initializers keep the official names, with three fused ones: `.../multi_head_attention/qkv/w`
(query | key | value columns), `.../moe/expert_E/wv` (linear | linear_v columns, (D, 2F)) and
`.../moe/expert_E/o` (linear_1[E]); int8 ones end in `.q8` / `.scales` (MatMulNBits layout).

Weights are written as external data one tensor (quantised: one column chunk) at a time, so
building never holds more than one expert's matrices; `WeightWriter(None)` writes nothing and
lets a test build the full-size graph from shapes alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig
from grok_deploy.onnx import BLOCK_SIZE

OPSET = 21
ALIGN = 4096  # external-data offsets page-aligned, so ONNX Runtime can map them
INLINE_BYTES = 1024
Q8_CHUNK = 4096  # output columns quantised per chunk (bounded memory for 6144 x 65536)
NEG_INF = -1e30


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order."""
    kv = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "position_ids", "attention_mask"] + [f"past_key_values.{k}" for k in kv]
    return inputs, ["logits"] + [f"present.{k}" for k in kv]


class WeightWriter:
    """Initializers as external data in `path` (or, with path None, shapes only: nothing read)."""

    def __init__(self, path: Path | None):
        self.path, self.offset = path, 0
        self.file = open(path, "wb") if path else None
        self.location = path.name if path else "meta.data"

    def close(self) -> None:
        if self.file:
            self.file.close()

    def _proto(self, name: str, shape, dtype) -> TensorProto:
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        t.dims.extend(int(d) for d in shape)
        t.data_location = TensorProto.EXTERNAL
        length = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.offset += -self.offset % ALIGN
        for k, v in (("location", self.location), ("offset", self.offset), ("length", length)):
            t.external_data.add(key=k, value=str(v))
        return t

    def _write(self, arr: np.ndarray) -> None:
        if self.file:
            self.file.seek(self.offset)
            self.file.write(np.ascontiguousarray(arr).tobytes())
        self.offset += arr.nbytes

    def add(self, name: str, shape, produce: Callable[[], np.ndarray], dtype=np.float32) -> TensorProto:
        t = self._proto(name, shape, dtype)
        if self.file:
            arr = np.asarray(produce(), dtype=dtype)
            assert arr.shape == tuple(shape), (name, arr.shape, shape)
            self._write(arr)
        else:
            self.offset += int(np.prod(shape)) * np.dtype(dtype).itemsize
        return t

    def add_q8(self, name: str, k: int, n: int, block: int, produce: Callable[[], np.ndarray]):
        """W (K, N) f32 -> MatMulNBits B (N, K/block, block) uint8 (zero point 128) and scales."""
        nblk = -(-k // block)
        tb = self._proto(name + ".q8", (n, nblk, block), np.uint8)
        scales = []
        if self.file:
            w = produce()
            for lo in range(0, n, Q8_CHUNK):
                q, s = quantize_q8(w[:, lo:lo + Q8_CHUNK], block)
                self._write(q)
                scales.append(s)
            del w
        else:
            self.offset += n * nblk * block
        ts = self.add(name + ".scales", (n * nblk,), lambda: np.concatenate(scales, axis=None))
        return tb, ts


def quantize_q8(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit blocks along K: q = round(w / s) + 128, zero point 128.

    Per block, s is the one of these with the smaller error: max|w| / 127 of the block, or of
    the release's scale group holding it (the whole column, or one of its 8 K-blocks) when the
    block lies inside one. The release's int8 grid is then kept exactly where blocks line up.
    """
    k, n = w.shape
    nblk = -(-k // block)
    wt = np.zeros((n, nblk * block), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, nblk, block)
    amax = np.abs(wt).max(-1)  # (N, nblk)
    candidates = [amax, np.repeat(amax.max(-1, keepdims=True), nblk, axis=1)]  # block, column
    group = k // names.SCALE_K_BLOCKS
    if k % names.SCALE_K_BLOCKS == 0 and group % block == 0:  # the release's K-blocks
        gmax = amax.reshape(n, names.SCALE_K_BLOCKS, group // block).max(-1)
        candidates.append(np.repeat(gmax, group // block, axis=1))
    best_s, best_err = None, None
    for amax_c in candidates:
        s = np.where(amax_c > 0, amax_c / np.float32(127.0), np.float32(1.0)).astype(np.float32)
        q = np.clip(np.rint(wt / s[..., None]), -127, 127)
        err = np.abs(q * s[..., None] - wt).max(-1)
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    q = np.clip(np.rint(wt / best_s[..., None]), -127, 127) + 128
    return q.astype(np.uint8), best_s


def dequantize_q8(q: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    """Inverse of quantize_q8: (K, N) f32 (for tests)."""
    n = q.shape[0]
    return ((q.astype(np.float32) - 128) * s.reshape(n, -1, 1)).reshape(n, -1)[:, :k].T


class _Graph:
    """Nodes and initializers with generated names: `g.op("MatMul", a, b) -> output name`."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", out=None, **attrs):
        self.count += 1
        outs = [out] if out else [f"{op_type.lower()}_{self.count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self.count}",
                                           domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        self.count += 1
        name = f"const_{self.count}"
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


class DecoderBuilder:
    """Builds the decoder graph from standard ops (`export-onnx --graph standard`); `src` gives
    weights (`read(name)`, `read_expert(name, e)`). fused.FusedDecoderBuilder overrides the
    attention, the norms and `shared` with ONNX Runtime's fused operators."""

    opset = OPSET

    def __init__(self, cfg: GrokConfig, src, writer: WeightWriter, quant: str = "none", block: int = BLOCK_SIZE):
        if quant not in ("none", "int8"):
            raise ValueError(f"quant must be none or int8, got {quant!r}")
        self.cfg, self.src, self.w, self.quant, self.block = cfg, src, writer, quant, block
        self.g = _Graph()

    # --- weights ---------------------------------------------------------------------------
    def weight(self, name: str, shape, produce) -> str:
        if self.w.file and int(np.prod(shape)) * 4 <= INLINE_BYTES:
            self.g.inits.append(onnx.numpy_helper.from_array(np.asarray(produce(), np.float32), name))
        else:
            self.g.inits.append(self.w.add(name, shape, produce))
        return name

    def linear(self, x: str, name: str, k: int, n: int, produce) -> str:
        """x (..., K) @ W (K, N): MatMul on f32, MatMulNBits (8 bit, accuracy_level 4) on int8."""
        if self.quant == "none":
            return self.g.op("MatMul", x, self.weight(name, (k, n), produce))
        tb, ts = self.w.add_q8(name, k, n, self.block, produce)
        self.g.inits += [tb, ts]
        return self.g.op("MatMulNBits", x, tb.name, ts.name, domain="com.microsoft",
                         K=k, N=n, bits=8, block_size=self.block, accuracy_level=4)

    # --- blocks ----------------------------------------------------------------------------
    def rms_norm(self, x: str, name: str) -> str:
        g, d = self.g, self.cfg.emb_size
        w = self.weight(name, (d,), lambda: self.src.read(name))
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
        y = g.op("Div", x, g.op("Sqrt", g.op("Add", ms, g.const(self.cfg.norm_eps, np.float32))))
        return g.op("Mul", w, y)

    def rope(self, x: str, cos: str, sin: str) -> str:
        """Rotate-half over the whole head: x (B, T, H, dk); cos/sin (B, T, 1, dk)."""
        g, half = self.g, self.cfg.key_size // 2
        x1, x2 = g.op("Split", x, g.const([half, half]), n_out=2, axis=-1)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def attention(self, i: int, x: str) -> str:
        g, c = self.g, self.cfg
        d, dk, hq, hkv = c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads
        p = names.layer_path(i, "multi_head_attention/")

        def qkv():  # query, key and value side by side: (D, Hq*dk + 2*Hkv*dk)
            return np.concatenate([self.src.read(p + f"{n}/w") for n in ("query", "key", "value")], axis=1)

        heads = self.linear(x, p + "qkv/w", d, c.q_size + 2 * c.kv_size, qkv)
        heads = g.op("Reshape", heads, g.const([0, 0, hq + 2 * hkv, dk]))  # (B, T, Hq + 2 Hkv, dk)
        qk, v = g.op("Split", heads, g.const([hq + hkv, hkv]), n_out=2, axis=2)
        q, k = g.op("Split", self.rope(qk, self.cos, self.sin), g.const([hq, hkv]), n_out=2, axis=2)
        q = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, hkv, c.group_size, dk])), perm=[0, 2, 3, 1, 4])
        ctx = []
        for kind, new in (("key", k), ("value", v)):
            new = g.op("Transpose", new, perm=[0, 2, 1, 3])  # (B, Hkv, T, dk)
            present = g.op("ScatterND", f"past_key_values.{i}.{kind}", self.slots, new, out=f"present.{i}.{kind}")
            window = g.op("Slice", present, g.const([0]), self.window, g.const([2]))  # (B, Hkv, L, dk)
            ctx.append(g.op("Unsqueeze", window, g.const([2])))  # (B, Hkv, 1, L, dk)
        # (B, Hkv, G, T, dk) x (B, Hkv, 1, dk, L): query head j uses KV head j // G
        s = g.op("MatMul", q, g.op("Transpose", ctx[0], perm=[0, 1, 2, 4, 3]))
        s = g.op("Mul", s, g.const(c.attn_scale, np.float32))
        cap = g.const(c.max_attn_value, np.float32)
        s = g.op("Mul", g.op("Tanh", g.op("Div", s, cap)), cap)  # soft-cap, then the mask select
        s = g.op("Where", self.mask, s, g.const(NEG_INF, np.float32))
        o = g.op("MatMul", g.op("Softmax", s, axis=-1), ctx[1])  # (B, Hkv, G, T, dk)
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 3, 1, 2, 4]), g.const([0, 0, c.q_size]))
        return self.linear(o, p + "linear/w", c.q_size, d, lambda: self.src.read(p + "linear/w"))

    def moe(self, i: int, x: str) -> str:
        """x (N, D) -> (N, D); each token runs its k chosen experts only."""
        g, c = self.g, self.cfg
        d, k = c.emb_size, c.num_selected_experts
        gates, idx = self.route(i, x)
        pairs, ys = [], []
        for e in range(c.num_experts):
            hit = g.op("NonZero", g.op("Equal", idx, g.const(e)))  # (2, M): token, slot
            xe = g.op("Gather", x, g.op("Gather", hit, g.const(0), axis=0), axis=0)  # (M, D)
            ys.append(self.expert(i, e, xe))
            pairs.append(g.op("Transpose", hit, perm=[1, 0]))  # (M, 2)
        # every (token, slot) goes to exactly one expert: place the outputs, then mix with the gates
        # (a sum of k = 2 terms does not depend on the order, so this equals moe_sparse exactly)
        shape = g.op("Concat", g.op("Shape", x, end=1), g.const([k, d]), axis=0)
        zeros = g.op("ConstantOfShape", shape, value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.0]))
        placed = g.op("ScatterND", zeros, g.op("Concat", *pairs, axis=0), g.op("Concat", *ys, axis=0))
        mixed = g.op("Mul", placed, g.op("Unsqueeze", gates, g.const([-1])))  # (N, k, D)
        return g.op("ReduceSum", mixed, g.const([1]), keepdims=0)

    def route(self, i: int, x: str) -> tuple[str, str]:
        """Layer i's router on x (N, D): f32 softmax over all experts, then top-k -> (gates, experts),
        each (N, k); the gates are the raw probabilities (not renormalised)."""
        g, c = self.g, self.cfg
        p = names.layer_path(i, "")
        router = self.weight(p + "router/w", (c.emb_size, c.num_experts), lambda: self.src.read(p + "router/w"))
        probs = g.op("Softmax", g.op("MatMul", x, router), axis=-1)
        gates, idx = g.op("TopK", probs, g.const([c.num_selected_experts]), n_out=2, axis=-1)
        return gates, idx

    def expert_wv(self, i: int, e: int) -> Callable[[], np.ndarray]:
        """Expert e of layer i: its gate branch W (gets the GELU) and value branch V side by side (D, 2F)."""
        p = names.layer_path(i, "")
        return lambda: np.concatenate([self.src.read_expert(p + "moe/linear/w", e),
                                       self.src.read_expert(p + "moe/linear_v/w", e)], axis=1)

    def expert(self, i: int, e: int, xe: str) -> str:
        """Expert e of layer i on its rows xe (..., D): ((x V) * gelu_tanh(x W)) O -> (..., D)."""
        g, c = self.g, self.cfg
        d, f = c.emb_size, c.ffn_size
        p = names.layer_path(i, "")
        wv = self.expert_wv(i, e)
        a, b = g.op("Split", self.linear(xe, f"{p}moe/expert_{e}/wv", d, 2 * f, wv), g.const([f, f]), n_out=2, axis=-1)
        return self.linear(g.op("Mul", b, g.op("Gelu", a, approximate="tanh")), f"{p}moe/expert_{e}/o",
                           f, d, lambda: self.src.read_expert(p + "moe/linear_1/w", e))

    def shared(self) -> None:
        """Per-call tensors every layer uses: RoPE tables, the window, the mask, the cache slots."""
        g, c = self.g, self.cfg
        # RoPE (B, T, 1, dk): phase = pos * base^(-2i/dk), duplicated [phi, phi]
        inv_freq = c.rope_base ** (-np.arange(0, c.key_size, 2, dtype=np.float32) / c.key_size)
        phase = g.op("Mul", g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([-1])),
                     g.const(inv_freq.astype(np.float32), np.float32))
        phase = g.op("Unsqueeze", g.op("Concat", phase, phase, axis=-1), g.const([2]))
        self.cos, self.sin = g.op("Cos", phase), g.op("Sin", phase)
        # window L = max position + 1; mask (B, 1, 1, T, L) = causal x real token
        used = g.op("Add", g.op("ReduceMax", "position_ids", keepdims=0), g.const(1))
        self.window = g.op("Reshape", used, g.const([1]))
        key_pos = g.op("Range", g.const(0), used, g.const(1))
        causal = g.op("LessOrEqual", key_pos, g.op("Unsqueeze", "position_ids", g.const([-1])))  # (B, T, L)
        real = g.op("Cast", g.op("Slice", "attention_mask", g.const([0]), self.window, g.const([1])),
                    to=TensorProto.BOOL)
        self.mask = g.op("Unsqueeze", g.op("And", causal, g.op("Unsqueeze", real, g.const([1]))), g.const([1, 2]))
        # where this call's K/V go: (B, Hkv, T, 3) indices (batch, kv head, position) for ScatterND
        batch = g.op("Shape", "input_ids", end=1)
        shape = g.op("Concat", batch, g.const([c.num_kv_heads]), g.op("Shape", "input_ids", start=1),
                     g.const([1]), axis=0)
        b_idx = g.op("Reshape", g.op("Range", g.const(0), g.op("Squeeze", batch), g.const(1)), g.const([-1, 1, 1, 1]))
        h_idx = g.const(np.arange(c.num_kv_heads).reshape(1, -1, 1, 1))
        p_idx = g.op("Unsqueeze", "position_ids", g.const([1, 3]))
        self.slots = g.op("Concat", *(g.op("Expand", t, shape) for t in (b_idx, h_idx, p_idx)), axis=-1)

    # --- the whole decoder -------------------------------------------------------------------
    def build(self, layers: int | None = None) -> onnx.ModelProto:
        g, c = self.g, self.cfg
        n_layers = c.num_layers if layers is None else layers

        emb = self.weight(names.EMBEDDING, (c.vocab_size, c.emb_size), lambda: self.src.read(names.EMBEDDING))
        h = g.op("Mul", g.op("Gather", emb, "input_ids", axis=0), g.const(c.embedding_multiplier, np.float32))
        self.shared()
        h = g.op("Reshape", self.layers(h, n_layers), g.const([-1, c.emb_size]))
        logits = g.op("Mul", g.op("Gemm", h, emb, transB=1), g.const(c.output_multiplier, np.float32))
        shape = g.op("Concat", g.op("Shape", "input_ids"), g.const([c.vocab_size]), axis=0)
        g.op("Reshape", logits, shape, out="logits")
        return self._model(n_layers)

    def layers(self, h: str, n_layers: int) -> str:
        """The decoder layers on h (B, T, D); returns the final norm's output."""
        g, c = self.g, self.cfg
        for i in range(n_layers):
            lp = names.layer_path(i, "")
            a = self.attention(i, self.rms_norm(h, lp + "rms_norm/scale"))
            h = g.op("Add", h, self.rms_norm(a, lp + "rms_norm_1/scale"))
            x = g.op("Reshape", self.rms_norm(h, lp + "rms_norm_2/scale"), g.const([-1, c.emb_size]))
            m = g.op("Reshape", self.moe(i, x), g.op("Shape", h))
            h = g.op("Add", h, self.rms_norm(m, lp + "rms_norm_3/scale"))
        return self.rms_norm(h, names.FINAL_NORM)

    def _model(self, n_layers: int) -> onnx.ModelProto:
        c = self.cfg
        F, I = TensorProto.FLOAT, TensorProto.INT64
        kv = ["batch", c.num_kv_heads, "past", c.key_size]
        inputs = [helper.make_tensor_value_info(n, I, ["batch", "seq"]) for n in ("input_ids", "position_ids")]
        inputs.append(helper.make_tensor_value_info("attention_mask", I, ["batch", "past"]))
        outputs = [helper.make_tensor_value_info("logits", F, ["batch", "seq", c.vocab_size])]
        for i in range(n_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", F, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", F, kv))
        graph = helper.make_graph(self.g.nodes, "grok1_decoder", inputs, outputs, self.g.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.quant == "int8" or self.opset != OPSET:  # MatMulNBits / the fused graph's contrib ops
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        return helper.make_model(graph, opset_imports=opsets, producer_name="grok-deploy")


class ParamSource:
    """A canonical-layout dict of arrays as a weight source (tests; random params)."""

    def __init__(self, params):
        self.params = params

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.params[name], np.float32)

    def read_expert(self, name: str, e: int) -> np.ndarray:
        return np.asarray(self.params[name][e], np.float32)
