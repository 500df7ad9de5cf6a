"""grok-1-smoke: the preset TensorRT-LLM can build. Converted for real at tp 1, 2, 4 and 8, every
weight-only matrix of every rank file has the shape TensorRT-LLM allocates for it under both
padding rules (before 0.14: the exact split; from 0.14: full in/out features padded up to a
multiple of 64 x tp, then split), because every such dimension is a multiple of 64 x tp.
grok-1-tiny, the CPU preset, fails the same check (so the check can fail)."""
from __future__ import annotations

import pytest

from grok_deploy.model.config import PRESETS
from grok_deploy.trtllm import compat
from grok_deploy.trtllm import names as tn
from grok_deploy.trtllm.convert import convert, rank_specs
from grok_deploy.trtllm.safetensors_writer import read_header
from grok_deploy.trtllm.shard import Mapping

SMOKE = PRESETS["grok-1-smoke"]


def pad_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def full_features(m, part: str) -> tuple[int, int]:
    """(in, out) features of the whole (unsharded) matrix, as TensorRT-LLM's Grok layers declare them."""
    return {tn.QKV: (m.emb_size, (m.num_q_heads + 2 * m.num_kv_heads) * m.key_size),
            tn.DENSE: (m.q_size, m.emb_size),
            tn.FC: (m.emb_size, 2 * m.ffn_size),
            tn.PROJ: (m.ffn_size, m.emb_size)}[part]


def trtllm_shape(m, part: str, tp: int, padded: bool) -> tuple[int, int]:
    """[in, out] of one rank's weight-only parameter (W8A16 keeps [in, out] int8) under one rule."""
    k, n = full_features(m, part)
    if padded:  # 0.14+: WeightOnlyQuantLinear pads both to a multiple of 64 x tp
        k, n = pad_up(k, compat.PAD_MULTIPLE * tp), pad_up(n, compat.PAD_MULTIPLE * tp)
    return (k // tp, n) if part in tn.ROW_PARALLEL else (k, n // tp)


def mismatches(m, tp: int, headers: dict[int, dict]) -> list[str]:
    out = []
    for rank, header in headers.items():
        for name, info in header.items():
            part = next((p for p in tn.MATRICES if name.endswith(p + tn.WEIGHT)), None)
            if part is None:
                continue
            assert info["dtype"] == "I8"
            shape = tuple(info["shape"][-2:])  # experts first for fc / proj
            for padded in (False, True):
                if shape != trtllm_shape(m, part, tp, padded):
                    out.append(f"rank {rank} {name} {shape} != {trtllm_shape(m, part, tp, padded)} (padded={padded})")
    return out


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    from grok_deploy.checkpoint.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("smoke") / "ckpt", "grok-1-smoke", seed=0, progress=False)


def test_smoke_preset_sizes():
    m = SMOKE
    assert (m.key_size, m.num_layers, m.num_experts, m.num_selected_experts) == (128, 4, 8, 2)
    assert (m.emb_size, m.q_size, m.ffn_size) == (512, 2048, 1024)
    assert all(n % (64 * 8) == 0 for n in compat.weight_only_dims(m).values())
    for tp in (1, 2, 4, 8):
        assert compat.size_problems(m, tp, "w8a16") == []
    assert compat.size_problems(PRESETS["grok-1"], 8, "w8a16") == []  # Grok-1's own sizes are fine
    tiny = compat.size_problems(PRESETS["grok-1-tiny"], 8, "w8a16")
    assert tiny[0] == "head size 16: the soft-capped attention kernels take 128 or 256"
    assert "expert ffn (fc out / 2, proj in) 344" in tiny[1]
    # before 0.14 nothing is padded: only the head size stands in the way
    assert compat.size_problems(PRESETS["grok-1-tiny"], 8, "w8a16", version="0.12.0") == tiny[:1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_smoke_converted_loads_under_both_padding_rules(smoke_ckpt, tmp_path, tp):
    man = convert(smoke_ckpt, tmp_path / "trt", tp=tp, workers=2, progress=False)
    assert man["mapping"]["world_size"] == tp and man["requantized"] == ([] if tp == 8 else ["attention.dense", "mlp.proj"])
    headers = {r: {k: v for k, v in read_header(tmp_path / "trt" / tn.rank_file(r)).items() if k != "__metadata__"}
               for r in range(tp)}
    assert sum(len(h) for h in headers.values()) == sum(len(rank_specs(SMOKE, Mapping(tp), r, "w8a16", "bfloat16"))
                                                        for r in range(tp))
    matrices = [n for h in headers.values() for n in h if any(n.endswith(p + tn.WEIGHT) for p in tn.MATRICES)]
    assert len(matrices) == tp * SMOKE.num_layers * len(tn.MATRICES)
    assert mismatches(SMOKE, tp, headers) == []
    for dims in compat.weight_only_dims(SMOKE).values():
        assert dims % (64 * tp) == 0


def test_tiny_preset_fails_the_padded_rule():
    tiny, tp = PRESETS["grok-1-tiny"], 8
    headers = {r: {s.name: {"dtype": "I8" if s.dtype == "int8" else s.dtype, "shape": list(s.shape)}
                   for s in rank_specs(tiny, Mapping(tp), r, "w8a16", "bfloat16")} for r in range(tp)}
    bad = mismatches(tiny, tp, headers)
    assert bad and all("padded=True" in b for b in bad)  # the exact split always matches
    assert any("attention.qkv" in b for b in bad)  # hidden 256 is padded to 512 at tp 8
