"""The fused graph (onnx/fused.py): ONNX Runtime's GroupQueryAttention and fused norms, exact
against the reference on the verification prompts and on prompts it was not tuned to; why the
MoE stays a subgraph (ORT's CPU MoE kernels, replayed)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from grok_deploy.model.generate import generate
from grok_deploy.onnx.export import export_onnx
from grok_deploy.onnx.fused import rope_caches
from grok_deploy.onnx.ort_engine import OrtEngine, build_engine

ROOT = Path(__file__).resolve().parents[2]


def verification_prompts() -> list[str]:
    """The 10 prompts of the default pipeline's verify stage."""
    return yaml.safe_load((ROOT / "pipeline.yaml").read_text())["verify"]["prompts"]


@pytest.fixture(scope="module")
def fused_engine(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    export_onnx(tiny_ckpt, root / "onnx", "none", progress=False)
    build_engine(root / "onnx", root / "engine", max_batch_size=4, max_seq_len=160)
    return root


def test_fused_graph_uses_the_contrib_ops(fused_engine):
    model = onnx.load(str(fused_engine / "onnx" / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GroupQueryAttention"] == 12 and ops["SkipSimplifiedLayerNormalization"] == 24
    assert ops["RMSNormalization"] == 1 + 2 * 12  # layer 0's input norm; each branch output's norm
    assert not ops["Tanh"] and ops["Softmax"] == 12  # no hand-made attention: the softmaxes are the routers'
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["num_heads"] == 16 and attrs["kv_num_heads"] == 8 and attrs["do_rotary"] == 1
    assert attrs["softcap"] == 30.0 and abs(attrs["scale"] - 0.25) < 1e-7 and attrs["rotary_interleaved"] == 0
    assert list(gqa.output[1:]) == ["present.0.key", "present.0.value"]
    assert gqa.input[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    man = json.loads((fused_engine / "onnx" / "manifest.json").read_text())
    assert man["graph"] == "fused" and man["opsets"] == {"ai.onnx": 23, "com.microsoft": 1}
    # the batched MoE: one NonZero, one Gelu and one summing ScatterND per layer, not one per expert
    assert ops["NonZero"] == ops["Gelu"] == ops["ScatterND"] == 12 and ops["MatMul"] == 12 * (1 + 2 + 2 * 8)
    scatter = next(n for n in model.graph.node if n.op_type == "ScatterND")
    assert helper.get_attribute_value(scatter.attribute[0]) == b"add"


def test_rope_caches_match_the_reference_tables():
    import torch

    from grok_deploy.model.config import GrokConfig
    from grok_deploy.model.grok import rope_tables

    cfg = GrokConfig.from_name("grok-1-tiny")
    cos, sin = rope_caches(cfg)
    ref_cos, ref_sin = rope_tables(torch.arange(cfg.sequence_len), cfg.key_size, cfg.rope_base)
    assert cos.shape == (cfg.sequence_len, cfg.key_size // 2)
    assert np.abs(cos - ref_cos[:, :8].numpy()).max() < 1e-6 and np.abs(sin - ref_sin[:, 8:].numpy()).max() < 1e-6


def test_verification_prompts_give_the_reference_greedy_tokens(fused_engine, tiny_model, tiny_tokenizer):
    """float32: exact greedy tokens on the 10 prompts, batched in the engine's in-flight pool."""
    prompts = [tiny_tokenizer.encode(p) for p in verification_prompts()]
    assert len(prompts) == 10
    ref = generate(tiny_model, prompts, 24, return_logits=True)
    eng = OrtEngine(fused_engine / "engine")
    ids, logits = [], []
    for lo in range(0, 10, 4):  # the pool holds 4: the prompts in 3 batches of different lengths
        out = eng.generate(prompts[lo:lo + 4], 24, return_logits=True)
        ids += out.output_ids
        logits += out.logits
    assert ids == ref.output_ids
    diff = max(np.abs(a - b).max() for a, b in zip(logits, ref.logits))
    assert diff < 1e-3, diff


@pytest.mark.parametrize("seed", [101, 202, 303])
def test_unseen_prompts_give_the_reference_greedy_tokens(fused_engine, tiny_model, seed):
    """Random prompts of random lengths (with pad ids inside: masked keys), 40 greedy steps."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 1024, int(rng.integers(1, 60))).tolist() for _ in range(3)]
    prompts[0][len(prompts[0]) // 2] = 0  # a pad token inside the prompt: masked as the reference masks it
    ref = generate(tiny_model, prompts, 40)
    got = OrtEngine(fused_engine / "engine").generate(prompts, 40)
    assert got.output_ids == ref.output_ids


def _moe_model(activation: str, fusion: int, fc3: bool, e=4, d=16, f=8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((e, (2 if fusion else 1) * f, d)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((e, d, f)).astype(np.float32), "w2")]
    inputs = ["x", "router", "w1", "", "w2"]
    if fc3:
        inits.append(numpy_helper.from_array(rng.standard_normal((e, f, d)).astype(np.float32), "w3"))
        inputs += ["", "w3"]
    node = helper.make_node("MoE", inputs, ["y"], domain="com.microsoft", k=2, activation_type=activation,
                            swiglu_fusion=fusion, normalize_routing_weights=0)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, d]),
                                              helper.make_tensor_value_info("router", TensorProto.FLOAT, [3, e])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_cpu_moe_kernel_has_no_gated_tanh_gelu():
    """Why the MoE is not the MoE op: Grok's expert is gelu_tanh(x W) * (x V), then W2. On CPU the
    fused gate/up form with GELU-tanh (geglu) is refused, and a separate gated fc3 is not implemented."""
    feeds = {"x": np.ones((3, 16), np.float32), "router": np.zeros((3, 4), np.float32)}
    with pytest.raises(Exception, match="Unsupported MoE activation type: geglu"):
        ort.InferenceSession(_moe_model("geglu", 2, False).SerializeToString(), providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(_moe_model("gelu", 0, True).SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="FC3 is not implemented for CPU MoE"):
        sess.run(None, feeds)
    # the one gated activation the CPU kernel has is SwiGLU (x W sigmoid(alpha x W)): it runs
    sess = ort.InferenceSession(_moe_model("swiglu", 1, False).SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, feeds)[0].shape == (3, 16)


def _qmoe_model(activation: str, fusion: int, fc3: bool, e=4, d=64, f=64) -> onnx.ModelProto:
    """QMoE, 8-bit experts (uint8 codes (E, N, K), per-row scales), the int8 export's would-be op."""
    rng = np.random.default_rng(0)

    def q(name, n, k):
        return [numpy_helper.from_array(rng.integers(0, 255, (e, n, k), dtype=np.uint8), name),
                numpy_helper.from_array(np.full((e, n), 0.01, np.float32), name + ".s")]

    n1 = (2 if fusion else 1) * f
    inits = q("w1", n1, d) + q("w2", d, f)
    inputs = ["x", "router", "w1", "w1.s", "", "w2", "w2.s", ""]
    if fc3:
        inits += q("w3", f, d)
        inputs += ["w3", "w3.s"]
    node = helper.make_node("QMoE", inputs, ["y"], domain="com.microsoft", k=2, activation_type=activation,
                            swiglu_fusion=fusion, normalize_routing_weights=0, expert_weight_bits=8)
    graph = helper.make_graph([node], "qmoe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, d]),
                                               helper.make_tensor_value_info("router", TensorProto.FLOAT, [3, e])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_cpu_qmoe_kernel_has_no_gated_tanh_gelu():
    """The int8 export keeps MatMulNBits experts for the same reason: QMoE on CPU refuses geglu and fc3 gating."""
    feeds = {"x": np.ones((3, 64), np.float32), "router": np.zeros((3, 4), np.float32)}
    with pytest.raises(Exception, match="Unsupported MoE activation type: geglu"):
        ort.InferenceSession(_qmoe_model("geglu", 2, False).SerializeToString(), providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(_qmoe_model("gelu", 0, True).SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="FC3 gating is not yet implemented on CPU for QMoE"):
        sess.run(None, feeds)
    sess = ort.InferenceSession(_qmoe_model("swiglu", 1, False).SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, feeds)[0].shape == (3, 64)
