"""The ONNX Runtime engine against the reference on grok-1-tiny: parity, int8 tolerance, in-flight batching."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TEST_PROMPT

from grok_deploy.model.engine import EngineError
from grok_deploy.model.generate import generate
from grok_deploy.onnx.export import INT8_LOGIT_TOL, INT8_MEAN_TOL, INT8_MIN_AGREEMENT, export_onnx
from grok_deploy.onnx.ort_engine import OPT_MODEL, OrtEngine, build_engine


@pytest.fixture(scope="module")
def engines(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort")
    out = {}
    for quant in ("none", "int8"):
        export_onnx(tiny_ckpt, root / f"onnx-{quant}", quant, progress=False)
        build_engine(root / f"onnx-{quant}", root / f"engine-{quant}", max_batch_size=4, max_seq_len=128)
        out[quant] = root / f"engine-{quant}"
    return out


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer.encode(TEST_PROMPT), [5, 6, 7], list(range(300, 317))]  # 3 different lengths


def test_build_writes_optimized_model_and_manifest(engines):
    man = json.loads((engines["none"] / "manifest.json").read_text())
    assert man["backend"] == "onnxruntime" and man["model"] == OPT_MODEL and man["quant"] == "none"
    assert man["session"]["intra_op_num_threads"] >= 1 and man["max_batch_size"] == 4
    assert (engines["none"] / OPT_MODEL).stat().st_size < 1 << 20  # initializers are external
    assert (engines["none"] / (OPT_MODEL + ".data")).stat().st_size > 100 << 20


def test_float32_parity_prefill_plus_32_steps(engines, tiny_model, prompts):
    assert len({len(p) for p in prompts}) == 3
    ref = generate(tiny_model, prompts, 33, return_logits=True)
    got = OrtEngine(engines["none"]).generate(prompts, 33, return_logits=True)
    assert got.output_ids == ref.output_ids
    for a, b in zip(got.logits, ref.logits):
        assert a.shape == b.shape == (33, 1024)
        assert np.abs(a - b).max() < 1e-3


def test_sampling_follows_the_reference(engines, tiny_model, prompts):
    ref = generate(tiny_model, prompts, 12, temperature=0.9, top_p=0.8, seed=11)
    got = OrtEngine(engines["none"]).generate(prompts, 12, temperature=0.9, top_p=0.8, seed=11)
    assert got.output_ids == ref.output_ids


def test_int8_within_tolerance_over_64_tokens(engines, tiny_model, prompts):
    """Teacher-forced on the reference's greedy tokens, so every step compares the same context."""
    ref = generate(tiny_model, prompts, 64, return_logits=True)
    eng = OrtEngine(engines["int8"])
    agree, diffs = 0, []
    for i, p in enumerate(prompts):
        rows = [eng.add(i, p)] + [eng.step([i], [t])[0] for t in ref.output_ids[i][:-1]]
        eng.remove(i)
        rows = np.stack(rows)
        agree += int((rows.argmax(-1) == np.array(ref.output_ids[i])).sum())
        diffs.append(np.abs(rows - ref.logits[i]))
    diffs = np.concatenate(diffs)
    assert agree / (64 * len(prompts)) >= INT8_MIN_AGREEMENT
    assert diffs.mean() < INT8_MEAN_TOL and diffs.max() < INT8_LOGIT_TOL
    assert diffs.max() > 1e-3  # it is quantised


def test_in_flight_add_step_remove_matches_single_runs(engines, tiny_model, prompts):
    eng = OrtEngine(engines["none"])
    a, b, c = prompts
    toks = {"a": [int(eng.add("a", a).argmax())]}
    toks["b"] = [int(eng.add("b", b).argmax())]
    for _ in range(3):
        rows = eng.step(["b", "a"], [toks["b"][-1], toks["a"][-1]])  # any order
        toks["b"].append(int(rows[0].argmax()))
        toks["a"].append(int(rows[1].argmax()))
    toks["c"] = [int(eng.add("c", c).argmax())]
    eng.remove("a")  # frees slot 0: "c" moves into it
    assert eng.slots.slot == {"b": 1, "c": 0}
    for _ in range(2):
        toks["b"].append(int(eng.step(["b"], [toks["b"][-1]])[0].argmax()))  # a subset: swapped to the front
    for _ in range(2):
        rows = eng.step(["c", "b"], [toks["c"][-1], toks["b"][-1]])
        toks["c"].append(int(rows[0].argmax()))
        toks["b"].append(int(rows[1].argmax()))
    for name, p in (("a", a), ("b", b), ("c", c)):
        assert toks[name] == generate(tiny_model, [p], len(toks[name])).output_ids[0], name


def test_kv_cache_is_bound_in_place(engines, prompts):
    eng = OrtEngine(engines["none"], max_batch_size=2, max_seq_len=64)
    pool = eng.kv.ctypes.data
    n = len(prompts[0])
    logits = eng.add(0, prompts[0])
    bound = eng._binding(0, 1).get_outputs()  # the presents are the pool itself
    assert bound[0].data_ptr() == eng.kv[0, 0, 0:1].ctypes.data and bound[1].data_ptr() == eng.kv[0, 1, 0:1].ctypes.data
    written = np.abs(eng.kv[:, :, 0]).sum(axis=(1, 2, 4))  # (layers, positions)
    assert (written[:, :n] > 0).all() and (written[:, n:] == 0).all()
    eng.step([0], [int(logits.argmax())])
    assert (np.abs(eng.kv[:, :, 0, :, n]).sum(axis=(1, 2, 3)) > 0).all() and eng.kv.ctypes.data == pool


def test_engine_errors(engines):
    eng = OrtEngine(engines["none"], max_batch_size=1, max_seq_len=6)
    eng.add("x", [5, 6, 7, 8, 9])
    eng.step(["x"], [10])
    with pytest.raises(EngineError, match="is full"):
        eng.step(["x"], [11])
    with pytest.raises(EngineError, match="slots are busy"):
        eng.add("y", [5])
    with pytest.raises(EngineError, match="unknown sequence"):
        eng.remove("y")
    assert (eng.max_batch_size, eng.max_seq_len, eng.vocab_size) == (1, 6, 1024)
