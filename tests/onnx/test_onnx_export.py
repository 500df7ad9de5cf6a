"""export-onnx: graph structure, external data, the sparse MoE, and the full-size graph from shapes."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from grok_deploy.cli import main
from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig
from grok_deploy.model.grok import moe_sparse
from grok_deploy.onnx.decoder import build_model
from grok_deploy.onnx.export import export_onnx
from grok_deploy.onnx.fused import FusedDecoderBuilder
from grok_deploy.onnx.graph import (
    DecoderBuilder,
    ParamSource,
    WeightWriter,
    dequantize_q8,
    io_names,
    quantize_q8,
)


@pytest.fixture(scope="module")
def onnx_dir(tiny_ckpt, tmp_path_factory):
    """The default export: the fused graph (onnx/fused.py)."""
    out = tmp_path_factory.mktemp("onnx") / "f32"
    export_onnx(tiny_ckpt, out, "none", progress=False)
    return out


@pytest.fixture(scope="module")
def standard_dir(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "f32-standard"
    export_onnx(tiny_ckpt, out, "none", progress=False, graph="standard")
    return out


def run_graph(path, tokens: np.ndarray, past: np.ndarray | None = None, capacity: int = 32):
    """Prefill a right-padded batch at positions 0..T-1 with every cache bound as past and present
    (one buffer, as the engine and onnxruntime-genai bind it); returns logits and the caches."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cfg = GrokConfig.from_name("grok-1-tiny")
    b, t = tokens.shape
    mask = np.zeros((b, capacity), np.int64)
    mask[:, :t] = tokens != 0
    io = sess.io_binding()
    for name, arr in (("input_ids", tokens), ("position_ids", np.tile(np.arange(t), (b, 1))), ("attention_mask", mask)):
        io.bind_cpu_input(name, arr)
    shape = (b, cfg.num_kv_heads, capacity, cfg.key_size)
    caches = []
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            caches.append(np.zeros(shape, np.float32) if past is None else past.copy())
            ov = ort.OrtValue.ortvalue_from_numpy(caches[-1])
            io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
            io.bind_ortvalue_output(f"present.{i}.{kind}", ov)
    io.bind_output("logits", "cpu")
    sess.run_with_iobinding(io)
    return io.get_outputs()[-1].numpy(), caches


def test_export_writes_graph_external_data_and_manifest(onnx_dir):
    man = json.loads((onnx_dir / "manifest.json").read_text())
    assert man["quant"] == "none" and man["preset"] == "grok-1-tiny" and man["source_format"] == "xai"
    assert set(man["io"]["inputs"]) >= {"input_ids", "position_ids", "attention_mask"}
    assert (onnx_dir / "model.onnx").stat().st_size < 1 << 20  # the graph only; weights are external
    assert man["files"]["model.onnx.data"]["bytes"] >= 0.99 * GrokConfig.from_name("grok-1-tiny").param_count() * 4
    onnx.checker.check_model(str(onnx_dir / "model.onnx"))
    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    big = [t for t in model.graph.initializer if int(np.prod(t.dims)) * 4 > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    inputs, outputs = io_names(12)
    assert [i.name for i in model.graph.input] == inputs
    assert [o.name for o in model.graph.output] == outputs
    dims = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert inputs[3] == "past_key_values.0.key" and dims == ["batch", 8, "past", 16]


@pytest.mark.parametrize("graph", ["fused", "standard"])
def test_graph_prefill_matches_reference_and_writes_cache_in_place(graph, request, tiny_model):
    folder = request.getfixturevalue("onnx_dir" if graph == "fused" else "standard_dir")
    tokens = np.array([[5, 6, 7, 0, 0, 0], [10, 11, 12, 13, 14, 15], [40, 0, 42, 43, 0, 0]], np.int64)
    past = np.random.default_rng(0).standard_normal((3, 8, 32, 16)).astype(np.float32)
    logits, presents = run_graph(folder / "model.onnx", tokens, past)
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(tokens)).numpy()
    real = tokens != 0  # pad positions are not compared (their logits are unused)
    assert np.abs(logits[real] - ref[real]).max() < 1e-3
    cache = tiny_model.new_cache(3, 32)
    with torch.no_grad():
        tiny_model(torch.from_numpy(tokens), cache=cache, start=torch.zeros(3, dtype=torch.long))
    k0 = presents[0]  # layer 0 key: slots 0..5 written, the rest of the past untouched
    assert np.abs(k0[:, :, :6] - cache.k[0][:, :6].permute(0, 2, 1, 3).numpy()).max() < 1e-4
    assert np.array_equal(k0[:, :, 6:], past[:, :, 6:])


def moe_graph(cfg, params, layer=0, builder=DecoderBuilder, quant=None, data=None):
    """Layer `layer`'s MoE alone (x (n, D) -> y). Without `quant` every weight is inlined and every
    projection a float MatMul; with it the builder's own weights and projections (MatMulNBits at
    int8), written to the external-data file `data` (save the model beside it)."""
    b = builder(cfg, ParamSource(params), WeightWriter(data), quant or "none")
    if quant is None:
        b.weight = lambda name, shape, produce: _inline(b.g, name, produce())  # small: everything inline
        b.linear = lambda x, name, k, n, produce: b.g.op("MatMul", x, _inline(b.g, name, produce()))
    b.g.op("Identity", b.moe(layer, "x"), out="y")
    b.w.close()
    graph = onnx.helper.make_graph(b.g.nodes, "moe", [onnx.helper.make_tensor_value_info("x", 1, ["n", cfg.emb_size])],
                                   [onnx.helper.make_tensor_value_info("y", 1, ["n", cfg.emb_size])], b.g.inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                        onnx.helper.make_opsetid("com.microsoft", 1)])


def _inline(g, name, arr):
    g.inits.append(onnx.numpy_helper.from_array(np.asarray(arr, np.float32), name))
    return name


@pytest.mark.parametrize("builder", [DecoderBuilder, FusedDecoderBuilder])
@pytest.mark.parametrize("n_tokens", [1, 3, 64])
def test_moe_graph_equals_moe_sparse(n_tokens, builder):
    cfg = GrokConfig.from_name("grok-1-tiny", num_layers=1)
    rng = np.random.default_rng(n_tokens)
    p = names.layer_path(0, "")
    d, f = cfg.emb_size, cfg.ffn_size
    params = {p + "router/w": rng.standard_normal((d, 8), np.float32) * 0.2,
              p + "moe/linear/w": rng.standard_normal((8, d, f), np.float32) / 16,
              p + "moe/linear_v/w": rng.standard_normal((8, d, f), np.float32) / 16,
              p + "moe/linear_1/w": rng.standard_normal((8, f, d), np.float32) / 18}
    x = rng.standard_normal((n_tokens, d), np.float32)
    sess = ort.InferenceSession(moe_graph(cfg, params, builder=builder).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    t = {k: torch.from_numpy(v) for k, v in params.items()}
    ref = moe_sparse(torch.from_numpy(x), t[p + "router/w"], t[p + "moe/linear/w"], t[p + "moe/linear_v/w"],
                     t[p + "moe/linear_1/w"], 2).numpy()
    assert np.abs(got - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_the_batched_moe_equals_the_per_expert_subgraph_bit_for_bit(tmp_path, quant):
    """The fused graph's batched MoE gives each expert the same rows in the same order as the
    standard graph's per-expert subgraph: the same outputs, for one token (decode), a prefill's
    worth, and rows that leave experts without tokens."""
    rng = np.random.default_rng(7)
    cfg = GrokConfig.from_name("grok-1-tiny")
    d, f, e = cfg.emb_size, cfg.ffn_size, cfg.num_experts
    p = names.layer_path(0, "")
    params = {p + "router/w": rng.standard_normal((d, e)), p + "moe/linear/w": rng.standard_normal((e, d, f)) / 16,
              p + "moe/linear_v/w": rng.standard_normal((e, d, f)) / 16,
              p + "moe/linear_1/w": rng.standard_normal((e, f, d)) / 18}
    runs = {}
    for name, builder in (("standard", DecoderBuilder), ("fused", FusedDecoderBuilder)):
        (tmp_path / name).mkdir()
        model = moe_graph(cfg, params, builder=builder, quant=quant, data=tmp_path / name / "w.data")
        onnx.save(model, str(tmp_path / name / "moe.onnx"))
        runs[name] = ort.InferenceSession(str(tmp_path / name / "moe.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 2, 3, 37):
        x = rng.standard_normal((n, d)).astype(np.float32)
        got = {k: s.run(["y"], {"x": x})[0] for k, s in runs.items()}
        assert got["fused"].shape == (n, d) and np.abs(got["fused"]).max() > 0
        assert np.array_equal(got["fused"], got["standard"]), (n, np.abs(got["fused"] - got["standard"]).max())


@pytest.mark.parametrize("graph", ["fused", "standard"])
def test_moe_is_sparse_in_the_graph(graph, request):
    """Per layer, 8 experts each fed only its tokens' rows (standard: a Gather of its own NonZero;
    fused: its part of a Split, by the experts' counts, of the rows gathered in expert order); no
    stacked expert tensors."""
    folder = request.getfixturevalue("onnx_dir" if graph == "fused" else "standard_dir")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    expert_mm = [n for n in model.graph.node if n.op_type == "MatMul" and "/moe/expert_" in n.input[1]]
    assert len(expert_mm) == 12 * 16
    for n in expert_mm:
        if n.input[1].endswith("/wv"):  # the first expert matmul reads only its tokens
            rows = producer[n.input[0]]
            if graph == "fused":
                assert rows.op_type == "Split" and len(rows.output) == 8
                counts = producer[rows.input[1]]  # per expert, its (token, slot) pairs
                assert counts.op_type == "ReduceSum" and producer[rows.input[0]].op_type == "Gather"
                assert producer[producer[counts.input[0]].input[0]].op_type == "Equal"
            else:
                assert rows.op_type == "Gather"
                assert producer[producer[rows.input[1]].input[0]].op_type == "NonZero"
    assert sum(n.op_type == "NonZero" for n in model.graph.node) == 12 * (1 if graph == "fused" else 8)
    assert not [t.name for t in model.graph.initializer if len(t.dims) == 3]  # no (E, D, F) tensor


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_grok1_one_layer_graph_from_shapes(quant, tmp_path):
    """The full-size grok-1 graph (one layer) built from shapes alone: no weight is read or held."""
    cfg = GrokConfig.from_name("grok-1")
    tracemalloc.start()
    model = build_model(cfg, None, None, quant, layers=1)  # src None: any read would fail
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 << 20
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    p = names.layer_path(0, "")
    assert inits[names.EMBEDDING] == [131072, 6144] and inits[p + "router/w"] == [6144, 8]
    if quant == "none":
        assert inits[p + "multi_head_attention/qkv/w"] == [6144, 6144 + 2 * 1024]
        assert inits[p + "multi_head_attention/linear/w"] == [6144, 6144]
        assert inits[p + "moe/expert_7/wv"] == [6144, 2 * 32768] and inits[p + "moe/expert_7/o"] == [32768, 6144]
    else:
        assert inits[p + "moe/expert_7/wv.q8"] == [65536, 48, 128]
        assert inits[p + "moe/expert_7/o.q8"] == [6144, 256, 128]
        assert inits[p + "moe/expert_7/o.scales"] == [6144 * 256]
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 2 + 16
        attrs = {a.name: a.i for a in nbits[0].attribute}
        assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4 and attrs["block_size"] == 128
    assert [i.name for i in model.graph.input] == io_names(1)[0]
    assert [o.name for o in model.graph.output] == io_names(1)[1]
    logits = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert logits == ["batch", "seq", 131072]
    kv = [d.dim_param or d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim]
    assert kv == ["batch", 8, "past", 128]
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "meta.data").touch()  # the external-data file the shapes-only graph names
    onnx.checker.check_model(str(tmp_path / "model.onnx"))


def test_quantize_q8_keeps_the_release_grid_and_pads_k():
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (344, 40))
    codes[0] = 127  # the release's per-column scale is max|w| / 127
    scale = rng.uniform(0.001, 0.01, 40).astype(np.float32)
    w = (codes * scale).astype(np.float32)
    q, s = quantize_q8(w, 64)
    assert q.shape == (40, 6, 64) and s.shape == (40, 6) and q.dtype == np.uint8
    assert np.abs(dequantize_q8(q, s, 344) - w).max() < 1e-6  # the int8 grid kept exactly
    assert (q[:, -1, 344 - 320:] == 128).all()  # padding of the last block is zero
    noisy = rng.standard_normal((256, 8)).astype(np.float32)
    q, s = quantize_q8(noisy, 64)
    assert np.all(np.abs(dequantize_q8(q, s, 256) - noisy) <= np.repeat(s, 64, axis=1).T / 2 + 1e-6)


def test_cli_export_int8_and_user_errors(tiny_ckpt, tmp_path, capsys):
    assert main(["export-onnx", str(tiny_ckpt), str(tmp_path / "q8"), "--quant", "int8"]) == 0
    man = json.loads((tmp_path / "q8" / "manifest.json").read_text())
    assert man["quant"] == "int8" and man["int8"]["accuracy_level"] == 4
    model = onnx.load(str(tmp_path / "q8" / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 12 * (2 + 16)
    assert not list(tmp_path.glob("q8.tmp-*"))
    assert main(["export-onnx", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err


def test_export_streams_each_tensor_once(tiny_ckpt, tmp_path):
    """Weights are read one leaf, or one expert slice, at a time: never a stacked (E, D, F) leaf."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.onnx.export import write_onnx

    ckpt = open_checkpoint(tiny_ckpt)
    reads = []

    class Spy:
        def read(self, name):
            reads.append(name)
            return ckpt.read(name)

        def read_expert(self, name, e):
            reads.append((name, e))
            return ckpt.read_expert(name, e)

    write_onnx(ckpt.config, Spy(), tmp_path / "onnx")
    assert len(reads) == len(set(reads))
    assert not [r for r in reads if isinstance(r, str) and "/moe/" in r]
    leaves = names.flatten_order(12)
    expected = {n for n in leaves if "/moe/" not in n} | {(n, e) for n in leaves if "/moe/" in n for e in range(8)}
    assert set(reads) == expected
