"""export-onnx: the checkpoint -> an ONNX decoder with a KV cache (graph in fused.py, or graph.py
with `--graph standard`), plus genai_config.json and tokenizer files for onnxruntime-genai (genai.py).

Writes `OUT/model.onnx` (the graph, a few hundred KB), `OUT/model.onnx.data` (every weight, as
external data: the 2 GB protobuf limit never applies) and `OUT/manifest.json` (last). Weights
stream from the checkpoint one tensor (one expert slice) at a time.

`--quant int8`: the attention and expert matrices become `com.microsoft.MatMulNBits` (bits 8,
symmetric blocks of 128 along K, zero point 128, accuracy_level 4 = int8 activations); the router,
norms and the tied embedding / unembedding stay float32 (they are float in the release too).
Weights keep the release's int8 grid exactly wherever a block lies inside one of its scale
groups (always for grok-1: its K-blocks of 768 and 4096 are multiples of 128). Tolerances against
the float32 reference are the INT8_* constants below (tests/test_ort_engine.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from grok_deploy.manifest import sha256_file
from grok_deploy.onnx import BLOCK_SIZE

QUANTS = ("none", "int8")
GRAPHS = ("fused", "standard")  # onnx/fused.py (ONNX Runtime's fused operators) | onnx/graph.py
# int8 tolerances against the float32 reference, teacher-forced greedy over 64 tokens on
# grok-1-tiny (logits span about +-19). Measured: mean 0.03, max 1.0 in isolated rows, as
# when a near-tied router choice flips; int8 activations (accuracy_level 4) give most of the
# mean (weight-only, accuracy_level 0, gives 0.01 but runs 10-50x slower).
INT8_MEAN_TOL = 0.06
INT8_LOGIT_TOL = 2.0
INT8_MIN_AGREEMENT = 0.95
FLOAT32_LOGIT_TOL = 1e-3


def io_spec(cfg) -> dict:
    """The graph's inputs and outputs as written into the manifest."""
    kv = ["batch", cfg.num_kv_heads, "past", cfg.key_size]
    return {
        "inputs": {
            "input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
            "position_ids": {"dtype": "int64", "shape": ["batch", "seq"],
                             "doc": "position of each token; also the cache slot its K/V is written to"},
            "attention_mask": {"dtype": "int64", "shape": ["batch", "past"],
                               "doc": "1 where a cache slot holds a real (non-pad) token, this call's tokens included"},
            "past_key_values.N.key|value": {"dtype": "float32", "shape": kv, "layers": cfg.num_layers},
        },
        "outputs": {
            "logits": {"dtype": "float32", "shape": ["batch", "seq", cfg.vocab_size]},
            "present.N.key|value": {"dtype": "float32", "shape": kv,
                                    "doc": "past with this call's K/V written at position_ids; bind the same "
                                           "buffer as past (the fused graph's GroupQueryAttention keeps the "
                                           "rest of the cache only then)"},
        },
        "kv_cache": "fixed capacity (past = capacity); bind the same buffer as past and present for an "
                    "in-place update; attention reads slots [0, max(position_ids)]",
        "multipliers": {"embedding": cfg.embedding_multiplier, "output": cfg.output_multiplier},  # exact (f32)
    }


class _Tracked:
    """A weight source that advances a progress bar on every read."""

    def __init__(self, ckpt, bar):
        self.ckpt, self.bar = ckpt, bar

    def read(self, name):
        arr = self.ckpt.read(name)
        self._check(name, arr)
        self.bar.update(arr.nbytes, name=name)
        return arr

    def read_expert(self, name, e):
        arr = self.ckpt.read_expert(name, e)
        self._check(name, arr)
        self.bar.update(arr.nbytes, name=f"{name}[{e}]")
        return arr

    def _check(self, name, arr) -> None:
        from grok_deploy.checkpoint.base import check_finite

        check_finite(getattr(self.ckpt, "path", "the weights"), name, arr)



def export_onnx(src, out, quant: str = "none", preset: str | None = None, progress: bool = True,
                graph: str = "fused", block: int = BLOCK_SIZE) -> dict:
    """Export checkpoint `src` as an ONNX decoder into folder `out`; returns the manifest.
    `graph`: "fused" (ONNX Runtime's fused operators, onnx/fused.py) or "standard" (standard ops)."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.errors import UserError
    from grok_deploy.manifest import check_output

    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    if graph not in GRAPHS:
        raise UserError(f"--graph {graph!r}: use one of {', '.join(GRAPHS)}")
    ckpt = open_checkpoint(src, preset=preset)
    check_output(Path(out), ckpt.path, "export-onnx")
    provenance = {"source": str(Path(src).resolve()), "source_format": ckpt.format}
    return write_onnx(ckpt.config, ckpt, out, quant, provenance, progress, graph, ckpt.tokenizer_path, block)


def min_bytes(cfg, quant: str) -> int:
    """A lower bound of the export's size: the weights as float32, or as int8 codes (their scales
    and the float32 embedding and norms come on top); 5% off for what the graph shares."""
    return cfg.param_count() * (1 if quant == "int8" else 4) * 95 // 100


def write_onnx(cfg, source, out, quant: str = "none", provenance: dict | None = None,
               progress: bool = False, graph: str = "fused", tokenizer=None, block: int = BLOCK_SIZE) -> dict:
    """The export core on any weight source (`read(name)`, `read_expert(name, e)`); with
    `tokenizer` (a SentencePiece tokenizer.model) the folder also opens in onnxruntime-genai;
    `block`: the int8 block along K (bench/onnx_decode.py rebuilds the previous export with 64)."""
    import onnx

    from grok_deploy import __version__
    from grok_deploy.errors import space_errors
    from grok_deploy.manifest import atomic_dir, check_space
    from grok_deploy.onnx.genai import write_genai_files
    from grok_deploy.onnx.decoder import build_model
    from grok_deploy.progress import Progress

    t0 = time.perf_counter()
    need, what = min_bytes(cfg, quant), f"the ONNX export ({cfg.name}, quant {quant})"
    check_space(Path(out), need, what)
    with space_errors(out, need, what), atomic_dir(out, "export-onnx") as tmp:
        with Progress(cfg.param_count() * 4, "export-onnx", show=None if progress else False) as bar:
            model = build_model(cfg, _Tracked(source, bar), tmp / "model.onnx.data", quant, block,
                                graph=graph)
        opset = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
        onnx.save(model, tmp / "model.onnx")
        del model
        onnx.checker.check_model(str(tmp / "model.onnx"))
        genai = write_genai_files(tmp, cfg, tokenizer)
        files = {"model.onnx": {"bytes": (tmp / "model.onnx").stat().st_size, "sha256": sha256_file(tmp / "model.onnx")},
                 "model.onnx.data": {"bytes": (tmp / "model.onnx.data").stat().st_size}}
        manifest = {
            "stage": "export-onnx", "version": __version__, **(provenance or {}),
            "preset": cfg.name, "config": cfg.to_dict(), "quant": quant,
            "opset": opset["ai.onnx"], "graph": graph, "opsets": opset, "io": io_spec(cfg), "files": files,
            "int8": {"op": "com.microsoft.MatMulNBits", "bits": 8, "block_size": block,
                     "zero_point": 128, "accuracy_level": 4,
                     "quantized": "attention q/k/v/o and expert matrices; router, norms, embedding f32",
                     "tolerance": {"mean_abs_logit_diff": INT8_MEAN_TOL, "max_abs_logit_diff": INT8_LOGIT_TOL,
                                   "greedy_agreement": INT8_MIN_AGREEMENT}} if quant == "int8" else None,
            "float32_logit_tolerance": FLOAT32_LOGIT_TOL,
            "onnxruntime_genai": {"config": "genai_config.json", "files": genai},
            "checker": "onnx.checker passed", "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def cli_export_onnx(args) -> int:
    from grok_deploy.errors import space_errors
    from grok_deploy.safe_files import lock

    root = Path(os.path.abspath(args.out)).parent
    with space_errors(root, None, "the lock file"), lock(root, f"grok-deploy export-onnx {args.out}"):
        man = export_onnx(args.ckpt, args.out, args.quant, getattr(args, "preset", None),
                          graph=getattr(args, "graph", "fused"))
    gb = man["files"]["model.onnx.data"]["bytes"] / 1e9
    print(f"wrote {args.out}/model.onnx ({man['preset']}, {man['graph']} graph, quant {man['quant']}, "
          f"{gb:.2f} GB of weights, "
          f"{man['seconds']:.1f} s)", file=sys.stderr)
    return 0
