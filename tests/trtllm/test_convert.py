"""convert: every rank tensor as trtllm-checkpoint.md §3, reassembly back to the source, atomic
output, and errors that name the file (the safetensors writer: test_safetensors_writer.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from grok_deploy.checkpoint import open_checkpoint
from grok_deploy.cli import main
from grok_deploy.errors import UserError
from grok_deploy.manifest import MARK
from grok_deploy.model import names
from grok_deploy.trtllm.convert import RankProducer, convert

# grok-1-tiny, written out so the expectations do not come from the code under test
D, HQ, HKV, DK, F, E, V, L = 256, 16, 8, 16, 344, 8, 1024, 12
NORMS = ("input_layernorm", "post_attn_layernorm", "post_layernorm", "post_mlp_layernorm")
TORCH = {"int8": torch.int8, "bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
LAYOUTS = {  # id: (tp, moe_tp, moe_ep, pp)
    "tp1": (1, 1, 1, 1), "tp2": (2, 2, 1, 1), "tp4": (4, 4, 1, 1), "tp8": (8, 8, 1, 1),
    "tp2-ep2": (2, 1, 2, 1), "tp8-moe4-ep2": (8, 4, 2, 1), "tp2-pp2": (2, 2, 1, 2),
}


def documented_tensors(tp, moe_tp, ep, pp, rank, quant="w8a16", dt="bfloat16") -> dict:
    """name -> (shape, dtype) of rank file `rank`, from the tables of trtllm-checkpoint.md §3."""
    tp_r, pp_r = rank % tp, rank // tp
    qkv, dense = (HQ + 2 * HKV) * DK // tp, HQ * DK // tp
    fc, proj, el = 2 * F // moe_tp, F // moe_tp, E // ep
    out = {}
    if pp_r == 0:
        out["transformer.vocab_embedding.weight"] = ((V, D), dt)
    for l in range(L // pp):
        p = f"transformer.layers.{l}."
        out.update({f"{p}{n}.weight": ((D,), dt) for n in NORMS})
        out[p + "mlp.router.weight"] = ((E, D), "float32")
        mats = {"attention.qkv": (D, qkv), "attention.dense": (dense, D),
                "mlp.fc": (el, D, fc), "mlp.proj": (el, proj, D)}
        for name, shape in mats.items():
            if quant == "w8a16":
                out[p + name + ".weight"] = (shape, "int8")
                out[p + name + ".per_channel_scale"] = (shape[:-2] + shape[-1:], dt)
            else:
                out[p + name + ".weight"] = (shape[:-2] + (shape[-1], shape[-2]), dt)
    if pp_r == pp - 1:
        out["transformer.ln_f.weight"] = ((D,), dt)
        out["lm_head.weight"] = ((V // tp, D), dt)
    return out


def reassemble(folder: Path, codes: bool = False) -> dict:
    """The canonical leaves rebuilt from the rank files: float32 values (W8A16 dequantised with the
    rank scales), or with codes=True the raw int8 codes of the quantised leaves."""
    cfg = json.loads((folder / "config.json").read_text())
    mp = cfg["mapping"]
    tp, pp, mtp, ep = mp["tp_size"], mp["pp_size"], mp["moe_tp_size"], mp["moe_ep_size"]
    quant = cfg["quantization"]["quant_algo"]
    pieces = defaultdict(dict)  # leaf -> {rank key: array}
    whole = {}
    for r in range(tp * pp):
        tp_r, pp_r = r % tp, r // tp
        key, moe_key = tp_r, (tp_r % ep, tp_r // ep)  # (moe_ep_rank, moe_tp_rank)
        with safe_open(str(folder / f"rank{r}.safetensors"), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}

        def mat(name):
            w = t[name + ".weight"]
            if quant is None:
                return w.float().transpose(-1, -2).numpy()
            if codes:
                return w.numpy()
            return (w.float() * t[name + ".per_channel_scale"].float()[..., None, :]).numpy()
        for name in t:
            if not name.startswith("transformer.layers."):
                continue
            l = int(name.split(".")[2])
            g = pp_r * (L // pp) + l
            lp, p = names.layer_path(g, ""), f"transformer.layers.{l}."
            if name == p + "attention.qkv.weight":
                w = mat(p + "attention.qkv")
                nq, nkv = HQ * DK // tp, HKV * DK // tp
                pieces[lp + "multi_head_attention/query/w"][key] = w[:, :nq]
                pieces[lp + "multi_head_attention/key/w"][key] = w[:, nq:nq + nkv]
                pieces[lp + "multi_head_attention/value/w"][key] = w[:, nq + nkv:]
            elif name == p + "attention.dense.weight":
                pieces[lp + "multi_head_attention/linear/w"][key] = mat(p + "attention.dense")
            elif name == p + "mlp.fc.weight":
                w = mat(p + "mlp.fc")
                half = w.shape[-1] // 2
                pieces[lp + "moe/linear_v/w"][moe_key] = w[..., :half]
                pieces[lp + "moe/linear/w"][moe_key] = w[..., half:]
            elif name == p + "mlp.proj.weight":
                pieces[lp + "moe/linear_1/w"][moe_key] = mat(p + "mlp.proj")
            elif not codes and name.endswith("router.weight"):
                whole.setdefault(lp + "router/w", t[name].numpy().T)
            elif not codes and name.endswith("layernorm.weight"):
                n = NORMS.index(name.split(".")[3])
                whole.setdefault(lp + ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3")[n] + "/scale",
                                 t[name].float().numpy())
        if not codes and "transformer.vocab_embedding.weight" in t:
            whole[names.EMBEDDING] = t["transformer.vocab_embedding.weight"].float().numpy()
        if not codes and "lm_head.weight" in t:
            pieces["lm_head"][key] = t["lm_head.weight"].float().numpy()
            whole[names.FINAL_NORM] = t["transformer.ln_f.weight"].float().numpy()
    for leaf, parts in pieces.items():
        if leaf == "lm_head":
            whole[leaf] = np.concatenate([parts[k] for k in range(tp)], 0)
        elif leaf.endswith(("moe/linear/w", "moe/linear_v/w", "moe/linear_1/w")):
            axis = -2 if leaf.endswith("linear_1/w") else -1
            whole[leaf] = np.concatenate(
                [np.concatenate([parts[(e, m)] for m in range(mtp)], axis) for e in range(ep)], 0)
        else:
            axis = 0 if leaf.endswith("linear/w") else -1
            whole[leaf] = np.concatenate([parts[k] for k in range(tp)], axis)
    return whole


def _convert(src, folder, layout, **kw):
    tp, mtp, ep, pp = layout
    return convert(src, folder, tp=tp, moe_tp=mtp, moe_ep=ep, pp=pp, progress=False, workers=1, **kw)


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_rank_tensors_as_documented(tiny_ckpt, tmp_path, layout):
    out = tmp_path / "trt"
    man = _convert(tiny_ckpt, out, layout)
    tp, mtp, ep, pp = layout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp,
                              "moe_tp_size": mtp, "moe_ep_size": ep}
    assert sorted(p.name for p in out.iterdir() if p.name != MARK) == sorted(
        ["config.json", "manifest.json"] + [f"rank{r}.safetensors" for r in range(tp * pp)])
    for r in range(tp * pp):
        want = documented_tensors(tp, mtp, ep, pp, r)
        path = out / f"rank{r}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(want)
            for name, (shape, dt) in want.items():
                t = f.get_slice(name)
                assert tuple(t.get_shape()) == shape, name
                assert f.get_tensor(name).dtype == TORCH[dt], name
        assert man["files"][path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert man["preprocessed"] is False and man["weight_layout"].startswith("[in, out] int8")
    assert not list(tmp_path.glob("trt.*"))  # no temporary folders left


def test_config_json_has_the_grok_keys(tiny_ckpt, tmp_path):
    _convert(tiny_ckpt, tmp_path / "trt", LAYOUTS["tp8"])
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["architecture"] == "Grok1ModelForCausalLM"
    assert {k: cfg[k] for k in ("dtype", "logits_dtype", "hidden_act", "position_embedding_type")} == {
        "dtype": "bfloat16", "logits_dtype": "float32", "hidden_act": "geglu",
        "position_embedding_type": "rope_gpt_neox"}
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (L, HQ, HKV)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_size"]) == (D, F, V, DK)
    assert (cfg["moe_num_experts"], cfg["moe_top_k"], cfg["moe_normalization_mode"]) == (8, 2, 0)
    assert "moe" not in cfg  # flat moe_* keys, as the Grok model reads them
    assert cfg["embedding_multiplier_scale"] == 78.38367176906169
    assert cfg["output_multiplier_scale"] == 0.5773502691896257
    assert cfg["max_attn_value"] == 30.0 and cfg["attn_output_multiplier"] == 0.25
    assert cfg["rotary_base"] == 10000.0 and cfg["norm_epsilon"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and cfg["use_parallel_embedding"] is False
    assert cfg["quantization"]["quant_algo"] == "W8A16" and cfg["quantization"]["kv_cache_quant_algo"] is None


def test_tp8_keeps_the_release_int8_bit_exact(tiny_ckpt, tmp_path, capsys):
    man = _convert(tiny_ckpt, tmp_path / "trt", LAYOUTS["tp8"], dtype="float32")
    assert man["requantized"] == [] and man["requant_max_abs_error"] == 0.0
    assert "requantised" not in capsys.readouterr().err
    ckpt = open_checkpoint(tiny_ckpt)
    codes, values = reassemble(tmp_path / "trt", codes=True), reassemble(tmp_path / "trt")
    for name in ckpt.names():
        if name in codes:
            assert np.array_equal(codes[name], ckpt.read_raw(name).weight), name
        assert np.array_equal(values[name], ckpt.read(name)), name
    assert np.array_equal(values["lm_head"], ckpt.read(names.EMBEDDING))


@pytest.mark.parametrize("layout", ["tp4", "tp8-moe4-ep2", "tp1"])
def test_requantised_within_the_printed_bound(tiny_ckpt, tmp_path, capsys, layout):
    man = _convert(tiny_ckpt, tmp_path / "trt", LAYOUTS[layout], dtype="float32")
    bound = man["requant_max_abs_error"]
    expected = ["mlp.proj"] if layout == "tp8-moe4-ep2" else ["attention.dense", "mlp.proj"]
    assert man["requantized"] == expected and 0 < bound
    assert f"largest error introduced {bound:.3e}" in capsys.readouterr().err
    ckpt = open_checkpoint(tiny_ckpt)
    values = reassemble(tmp_path / "trt")
    worst = 0.0
    for name in ckpt.names():
        diff = float(np.abs(values[name] - ckpt.read(name)).max())
        if name.endswith("moe/linear_1/w") or (name.endswith("attention/linear/w") and "attention.dense" in expected):
            worst = max(worst, diff)
            assert diff <= bound, name
        else:
            assert diff == 0.0, name  # column-parallel and float tensors stay exact
    assert worst == pytest.approx(bound)
    codes = reassemble(tmp_path / "trt", codes=True)
    assert all(np.abs(c.astype(np.int32)).max() <= 127 for c in codes.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quant_none_writes_dequantised_weights(tiny_ckpt, tmp_path, dtype):
    man = _convert(tiny_ckpt, tmp_path / "trt", LAYOUTS["tp2"], quant="none", dtype=dtype)
    assert man["weight_layout"] == "[out, in]" and man["requantized"] == []
    for r in range(2):
        want = documented_tensors(2, 2, 1, 1, r, quant="none", dt=dtype)
        with safe_open(str(tmp_path / "trt" / f"rank{r}.safetensors"), framework="pt") as f:
            assert {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()} == {
                k: (s, TORCH[d]) for k, (s, d) in want.items()}
    ckpt = open_checkpoint(tiny_ckpt)
    values = reassemble(tmp_path / "trt")
    rtol = 0.0 if dtype == "float32" else 2.0 ** -8
    for name in ckpt.names():
        src = ckpt.read(name)
        assert np.all(np.abs(values[name] - src) <= rtol * np.abs(src)), name


def test_output_is_atomic_and_replaces_an_older_conversion(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "trt"
    _convert(tiny_ckpt, out, LAYOUTS["tp2"])
    before = (out / "manifest.json").read_text()

    original = RankProducer.__iter__

    def broken(self):
        for i, item in enumerate(original(self)):
            if i == 5:
                raise OSError("disk full")
            yield item
    monkeypatch.setattr(RankProducer, "__iter__", broken)
    with pytest.raises(OSError, match="disk full"):
        _convert(tiny_ckpt, out, LAYOUTS["tp4"])
    assert (out / "manifest.json").read_text() == before  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trt"]
    monkeypatch.undo()
    man = _convert(tiny_ckpt, out, LAYOUTS["tp4"])
    assert man["mapping"]["tp_size"] == 4 and len(list(out.glob("rank*.safetensors"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trt"]


def test_workers_give_identical_files(tiny_ckpt, tmp_path):
    a = _convert(tiny_ckpt, tmp_path / "a", LAYOUTS["tp4"])
    b = convert(tiny_ckpt, tmp_path / "b", tp=4, progress=False, workers=2)
    assert {k: v["sha256"] for k, v in a["files"].items()} == {k: v["sha256"] for k, v in b["files"].items()}
    assert b["workers"] == 2


def test_foreign_output_folder_is_refused(tiny_ckpt, tmp_path):
    (tmp_path / "trt").mkdir()
    (tmp_path / "trt" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and was not written by grok-deploy convert"):
        _convert(tiny_ckpt, tmp_path / "trt", LAYOUTS["tp2"])
    assert sorted(p.name for p in (tmp_path / "trt").iterdir()) == ["notes.txt"]


def test_a_file_system_too_small_is_refused_before_anything_is_written(tiny_ckpt, tmp_path, capsys,
                                                                     monkeypatch):
    import collections

    import grok_deploy.manifest as manifest

    usage = collections.namedtuple("usage", "total used free")
    need = sum(s.nbytes for s in _rank_specs(tiny_ckpt, 2))
    monkeypatch.setattr(manifest.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - need + 1, need - 1))
    assert main(["convert", str(tiny_ckpt), str(tmp_path / "out" / "trt"), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    from grok_deploy.errors import mount_point

    assert err == (f"error: {tmp_path / 'out' / 'trt'}: the TensorRT-LLM checkpoint (tp 2, w8a16, bfloat16) "
                   f"needs {need / 1e9:.2f} GB ({need} bytes) and {tmp_path / 'out'} has {(need - 1) / 1e9:.2f} GB "
                   f"({need - 1} bytes) free on the file system mounted at {mount_point(tmp_path)}; "
                   "free space there or write the output elsewhere\n")
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == []  # no trt, no tmp
    monkeypatch.setattr(manifest.shutil, "disk_usage", lambda path: usage(10**12, 0, need))
    assert main(["convert", str(tiny_ckpt), str(tmp_path / "out" / "trt"), "--tp", "2"]) == 0


def _rank_specs(ckpt, tp):
    from grok_deploy.trtllm.convert import rank_specs
    from grok_deploy.trtllm.shard import Mapping

    cfg = open_checkpoint(ckpt).config
    return [s for r in range(tp) for s in rank_specs(cfg, Mapping(tp, 1, None, None), r, "w8a16", "bfloat16")]


@pytest.mark.parametrize("argv,message", [
    (["--tp", "3"], "--tp 3 does not divide the kv heads (8)"),
    (["--tp", "16"], "--tp 16 does not divide the kv heads (8)"),
    (["--tp", "8", "--moe-tp", "4", "--moe-ep", "4"], "--moe-tp 4 x --moe-ep 4 must equal --tp 8"),
    (["--tp", "2", "--pp", "5"], "--pp 5 does not divide the layers (12)"),
    (["--tp", "2", "--moe-ep", "16"], "--moe-ep 16 does not divide --tp 2"),
    (["--tp", "4", "--moe-tp", "3"], "--moe-tp 3 does not divide --tp 4"),
])
def test_impossible_layouts_are_user_errors(tiny_ckpt, tmp_path, capsys, argv, message):
    assert main(["convert", str(tiny_ckpt), str(tmp_path / "trt"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot shard this way") and message in err
    assert not (tmp_path / "trt").exists()


def test_w8a16_in_float32_is_refused_with_the_pipeline_schemas_words(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out" / "trt"
    assert main(["convert", str(tiny_ckpt), str(out), "--tp", "2", "--quant", "w8a16", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --dtype: float32 with quantization w8a16: TensorRT-LLM's weight-only GEMM and MoE plugins "
                   "have no float32 path for int8 weights; use bfloat16 (or quantization: none)\n")
    assert not (tmp_path / "out").exists()  # nothing written, not even the output root's lock
    # the pipeline refuses the same pair with the same words after its key and line
    f = tmp_path / "pipeline.yaml"
    f.write_text("quantization: w8a16\ndtype: float32\nengine:\n  backend: trtllm\n")
    assert main(["plan", str(f)]) == 2
    assert capsys.readouterr().err == f"error: pipeline.yaml line 2: dtype: {err.split('--dtype: ', 1)[1]}"


@pytest.mark.timeout(120)
def test_missing_or_truncated_source_names_the_file(tiny_ckpt, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "trt"), "--tp", "2"]) == 2
    assert "nowhere" in capsys.readouterr().err
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    victim = src / "ckpt-0" / "tensor00030_000"  # a layer-10 matrix, read inside a worker
    victim.write_bytes(victim.read_bytes()[:1000])
    code = main(["convert", str(src), str(tmp_path / "trt"), "--tp", "2", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "tensor00030_000" in err and "truncated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_block_sizes_do_not_change_the_files(tiny_ckpt, tmp_path, monkeypatch):
    """Codes and requantisation are streamed in row blocks; tiny blocks (several per slice) must
    give the same bytes as the defaults (one block per tiny slice)."""
    import grok_deploy.trtllm.convert as cv

    a = _convert(tiny_ckpt, tmp_path / "a", LAYOUTS["tp2"])
    monkeypatch.setattr(cv, "ROW_BLOCK_BYTES", 3000)
    monkeypatch.setattr(cv, "REQUANT_BLOCK_BYTES", 5000)
    b = _convert(tiny_ckpt, tmp_path / "b", LAYOUTS["tp2"])
    assert a["files"] == b["files"] and a["requant_max_abs_error"] == b["requant_max_abs_error"]
