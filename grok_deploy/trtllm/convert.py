"""convert: the official checkpoint -> a TensorRT-LLM checkpoint for Grok (trtllm-checkpoint.md).

Streaming and bounded memory: each rank file is written front to back, its safetensors header
first (offsets computed from shapes and dtypes known up front), then one tensor, or one expert
slice, at a time, hashed on the way. Ranks run in worker processes (convert_pool.py). The output folder appears
atomically (temporary folder, then rename) and manifest.json is written last.

W8A16 keeps the raw [in, out] int8 codes ("preprocessed": false): TensorRT-LLM's mixed-GEMM
preprocessing is architecture-specific and runs in the build stage (build.py). The release's codes
are kept bit for bit where each rank's K-slice of a row-parallel matrix lies in one of its 8
K-blocks (tp 8, moe_tp 8); otherwise attention.dense / mlp.proj are requantised per output channel
(shard.requantize) and the largest error introduced is printed and kept in the manifest.

Sizes must split evenly, else a UserError names the values (shard.Mapping.problems): kv heads by
tp (no KV-head duplication), vocab by tp (no lm_head padding), ffn by moe_tp, experts by moe_ep,
layers by pp. grok-1-tiny's ffn 344 = 8 x 43 splits at every moe_tp up to 8 (43-row proj slices,
one K-block each); such narrow slices are for the CPU checks, not for TensorRT-LLM's GPU kernels.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from grok_deploy.errors import UserError
from grok_deploy.manifest import check_output, check_space, clean_stale, commit, new_tmp
from grok_deploy.model import names
from grok_deploy.trtllm import names as tn
from grok_deploy.trtllm import shard
from grok_deploy.trtllm.convert_pool import report, run_ranks
from grok_deploy.trtllm.safetensors_writer import RankWriter, Spec, np_dtype
from grok_deploy.trtllm.shard import Mapping

QUANTS = ("w8a16", "none")
ROW_CHUNK_BYTES = 64 << 20  # embedding / lm_head are streamed in row chunks of this size
ROW_BLOCK_BYTES = 512 << 10  # int8 codes are gathered in blocks that fit the L2 cache, and
                             # copied into the writer's block from there
REQUANT_BLOCK_BYTES = 1 << 20  # float32 rows per step when requantising
REPORT_BYTES = 64 << 20     # progress is reported from the workers in steps of this size


# --- what each rank file holds -------------------------------------------------------------------

def matrix_shapes(cfg, m: Mapping) -> dict[str, tuple[int, ...]]:
    """Per-rank [in, out] shape of each matrix (experts first for the MoE ones)."""
    d, f, e = cfg.emb_size, cfg.ffn_size, cfg.num_experts
    return {tn.QKV: (d, (cfg.q_size + 2 * cfg.kv_size) // m.tp),
            tn.DENSE: (cfg.q_size // m.tp, d),
            tn.FC: (e // m.moe_ep, d, 2 * f // m.moe_tp),
            tn.PROJ: (e // m.moe_ep, f // m.moe_tp, d)}


def rank_specs(cfg, m: Mapping, rank: int, quant: str, dtype: str) -> list[Spec]:
    """Every tensor of rank file `rank`, in file order (trtllm-checkpoint.md §3).

    W8A16: int8 weights [in, out] + per_channel_scale [out] in `dtype`. --quant none: weights in
    `dtype`, TensorRT-LLM's unquantised layout [out, in]."""
    d, v = cfg.emb_size, cfg.vocab_size
    mats = matrix_shapes(cfg, m)
    specs = []
    if m.pp_rank(rank) == 0:
        specs.append(Spec(tn.VOCAB_EMBEDDING, (v, d), dtype))
    for local, _ in enumerate(m.layers(rank, cfg.num_layers)):
        for part in tn.LAYER_ORDER:
            name = tn.layer_name(local, part)
            if part in tn.NORMS:
                specs.append(Spec(name, (d,), dtype))
            elif part == tn.ROUTER:
                specs.append(Spec(name, (cfg.num_experts, d), "float32"))
            elif quant == "w8a16":
                shape = mats[part]
                specs += [Spec(name + tn.WEIGHT, shape, "int8"),
                          Spec(name + tn.SCALE, shape[:-2] + shape[-1:], dtype)]
            else:
                *lead, k, n = mats[part]
                specs.append(Spec(name + tn.WEIGHT, (*lead, n, k), dtype))
    if m.pp_rank(rank) == m.pp - 1:
        specs += [Spec(tn.LN_F, (d,), dtype), Spec(tn.LM_HEAD, (v // m.tp, d), dtype)]
    return specs


def requantized_parts(cfg, m: Mapping, quant: str, source_format: str = "xai") -> list[str]:
    """Matrices whose W8A16 codes must be requantised per output channel (§6): the row-parallel
    ones whose rank K-slice spans several of the release's 8 K-blocks; all of them for a float
    (Hugging Face) source."""
    if quant != "w8a16":
        return []
    if source_format != "xai":
        return list(tn.MATRICES)
    out = []
    for part, k, world in ((tn.DENSE, cfg.q_size, m.tp), (tn.PROJ, cfg.ffn_size, m.moe_tp)):
        if any(shard.block_of_slice(k, names.SCALE_K_BLOCKS, r, world) is None for r in range(world)):
            out.append(part)
    return out


def trtllm_config(cfg, m: Mapping, quant: str, dtype: str) -> dict:
    """config.json of the TensorRT-LLM checkpoint: flat moe_* keys (§2)."""
    return {
        "architecture": tn.ARCHITECTURE, "dtype": dtype, "logits_dtype": "float32",
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_q_heads,
        "num_key_value_heads": cfg.num_kv_heads, "hidden_size": cfg.emb_size,
        "intermediate_size": cfg.ffn_size, "vocab_size": cfg.vocab_size, "head_size": cfg.key_size,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": cfg.rope_base,
        "rotary_scaling": None, "rotary_embedding_dim": cfg.key_size,
        "max_position_embeddings": cfg.sequence_len, "hidden_act": "geglu",
        "norm_epsilon": cfg.norm_eps, "attn_bias": False, "mlp_bias": False,
        "moe_num_experts": cfg.num_experts, "moe_top_k": cfg.num_selected_experts,
        "moe_normalization_mode": 0,  # NONE: softmax over all experts, top-k, no renormalisation
        "attn_output_multiplier": cfg.attn_scale,  # stored, unused (q_scaling 1 = 1/sqrt(head))
        "embedding_multiplier_scale": cfg.embedding_multiplier,
        "output_multiplier_scale": cfg.output_multiplier,
        "max_attn_value": cfg.max_attn_value,
        "tie_word_embeddings": True, "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "share_embedding_table": False, "disable_weight_only_quant_plugin": False,
        "mapping": m.to_dict(),
        "quantization": dict(tn.QUANTIZATION[quant]),
    }


# --- producing the bytes of one rank ---------------------------------------------------------------

def _hcat(pieces, dtype) -> np.ndarray:
    """Concatenate 2-D pieces along the columns (a single contiguous piece is returned as is)."""
    if len(pieces) == 1:
        return np.ascontiguousarray(pieces[0], dtype)
    out = np.empty((pieces[0].shape[0], sum(p.shape[1] for p in pieces)), dtype)
    col = 0
    for p in pieces:
        out[:, col:col + p.shape[1]] = p
        col += p.shape[1]
    return out


def _row_blocks(pieces, dtype):
    """The column concatenation of `pieces`, in row blocks small enough to stay in the CPU cache
    between the gather, the write and the hash."""
    width = sum(p.shape[1] for p in pieces) * np.dtype(dtype).itemsize
    step = max(1, ROW_BLOCK_BYTES // max(1, width))
    for a in range(0, pieces[0].shape[0], step):
        yield _hcat([p[a:a + step] for p in pieces], dtype)


def _slice_f32(unit, rows, cols) -> np.ndarray:
    """The exact float32 values of a (codes, scales) or (float, None) unit at [rows, cols]."""
    w, s = unit
    part = w[rows[0]:rows[1], cols[0]:cols[1]]
    if s is None:
        return np.asarray(part, dtype=np.float32)
    return shard.dequantize_rows(part, s[:, cols[0]:cols[1]], rows[0], w.shape[0])


class RankProducer:
    """Yields (tensor name, chunk) in rank_specs order; chunk bytes concatenate to the tensor."""

    def __init__(self, ckpt, m: Mapping, rank: int, quant: str, dtype: str):
        self.ckpt, self.cfg, self.m, self.rank = ckpt, ckpt.config, m, rank
        self.quant, self.dt = quant, np_dtype(dtype)
        self.errors: dict[str, float] = {}  # part -> largest |w - q*s| introduced

    def __iter__(self):
        cfg, m, rank = self.cfg, self.m, self.rank
        if m.pp_rank(rank) == 0:
            yield from self._rows(tn.VOCAB_EMBEDDING, 0, cfg.vocab_size)
        for local, layer in enumerate(m.layers(rank, cfg.num_layers)):
            def leaf(x):
                return self.ckpt.read_raw(names.layer_path(layer, x))
            for part in tn.LAYER_ORDER:
                name = tn.layer_name(local, part)
                if part in tn.NORMS:
                    yield name, np.asarray(leaf(tn.NORMS[part])).astype(self.dt)
                elif part == tn.ROUTER:
                    yield name, np.ascontiguousarray(np.asarray(leaf(tn.ROUTER_LEAF), np.float32).T)
                else:
                    yield from self._matrix(name, part, layer)
        if m.pp_rank(rank) == m.pp - 1:
            yield tn.LN_F, np.asarray(self.ckpt.read_raw(names.FINAL_NORM)).astype(self.dt)
            lo, hi = shard.bounds(cfg.vocab_size, m.tp_rank(rank), m.tp)
            yield from self._rows(tn.LM_HEAD, lo, hi)

    def _rows(self, name, lo, hi):
        """Rows lo..hi of the f32 embedding, cast, in chunks (vocab_embedding, lm_head); a fresh
        memory map per chunk, so the 3.2 GB table is never resident at once."""
        step = max(1, ROW_CHUNK_BYTES // (4 * self.cfg.emb_size))
        for a in range(lo, hi, step):
            emb = self.ckpt.read_raw(names.EMBEDDING)
            yield name, np.asarray(emb[a:min(a + step, hi)]).astype(self.dt)

    def _unit(self, layer: int, leaf: str, e: int | None):
        """One expert's (or the whole matrix's) 2-D weight: (int8 codes, bf16 scales) as fresh
        memory maps for the release, so touched pages are let go after each expert; (float32,
        None) for a float (Hugging Face) source."""
        name = names.layer_path(layer, leaf)
        if self.ckpt.format != "xai":
            return (self.ckpt.read(name) if e is None else self.ckpt.read_expert(name, e)), None
        raw = self.ckpt.read_raw(name)
        return (raw.weight, raw.scales) if e is None else (raw.weight[e], raw.scales[e])

    def _matrix(self, name, part, layer):
        """One matrix: per expert (or once), its rank slice as int8 + scales or as `dtype`."""
        cfg, m, rank = self.cfg, self.m, self.rank
        if part in tn.EXPERT_MATRICES:
            units, r, world = list(m.experts(rank, cfg.num_experts)), m.moe_tp_rank(rank), m.moe_tp
        else:
            units, r, world = [None], m.tp_rank(rank), m.tp
        scales = []
        for e in units:
            leaves = [self._unit(layer, leaf, e) for leaf in tn.MATRICES[part]]
            cuts = []  # per source leaf: (rows, cols) of this rank's slice
            for w, _ in leaves:
                k, n = w.shape
                cuts.append((shard.bounds(k, r, world), (0, n)) if part in tn.ROW_PARALLEL
                            else ((0, k), shard.bounds(n, r, world)))
            if self.quant == "w8a16":
                blocks, s = self._codes(part, leaves, cuts, r, world)
                scales.append(s)
                for block in blocks:
                    yield name + tn.WEIGHT, block
            else:
                w = _hcat([_slice_f32(u, *cut) for u, cut in zip(leaves, cuts)], np.float32)
                yield name + tn.WEIGHT, w.T.astype(self.dt, order="C")  # [out, in]
        if self.quant == "w8a16":
            yield name + tn.SCALE, scales[0] if units == [None] else np.stack(scales)

    def _codes(self, part, leaves, cuts, r, world):
        """int8 [in, out] codes, as an iterator of row blocks, and scales [out] (in dtype) of one
        expert's (or the matrix's) slice: the release's own codes where one scale row covers the
        slice, else requantised per output channel (§6)."""
        exact = []
        for (w, s), ((r0, r1), (c0, c1)) in zip(leaves, cuts):
            if s is None:
                break
            block = shard.block_of_slice(w.shape[0], s.shape[0], r, world) if s.shape[0] > 1 else 0
            if block is None:
                break
            exact.append((w[r0:r1, c0:c1], s[block, c0:c1]))
        else:
            s = np.concatenate([np.asarray(sc, np.float32) for _, sc in exact])
            cast = shard.round_to(s, self.dt)
            if not np.array_equal(cast, s):  # e.g. bf16 scales outside float16's normal range
                self._note(part, float(np.abs(cast - s).max()) * shard.INT8_MAX)
            return _row_blocks([p for p, _ in exact], np.int8), cast.astype(self.dt)
        if len(leaves) == 1 and leaves[0][1] is not None:  # a row slice of the release's codes
            return self._requantize_rows(part, leaves[0], cuts[0][0])
        w = _hcat([_slice_f32(u, *cut) for u, cut in zip(leaves, cuts)], np.float32)
        q, s, err = shard.requantize(w, self.dt)
        self._note(part, err)
        return _row_blocks([q], np.int8), s

    def _requantize_rows(self, part, unit, rows):
        """Requantise rows [r0, r1) of a block-scaled matrix in two passes over row blocks that
        stay in the CPU cache: max |w| per column, then the codes; no slice-sized float copy."""
        r0, r1 = rows
        w, s = unit
        step = max(1, REQUANT_BLOCK_BYTES // (4 * w.shape[1]))
        spans = [(a, min(a + step, r1)) for a in range(r0, r1, step)]

        def values(a, b):
            return shard.dequantize_rows(w[a:b], s, a, w.shape[0])
        absmax = np.zeros(w.shape[1], np.float32)
        for a, b in spans:
            v = values(a, b)
            np.maximum(absmax, np.maximum(v.max(axis=0), -v.min(axis=0)), out=absmax)
        scale = shard.requant_scale(absmax, self.dt)

        def blocks():
            for a, b in spans:
                q, err = shard.quantize_with(values(a, b), scale)
                self._note(part, err)
                yield q
        return blocks(), scale

    def _note(self, part, err):
        self.errors[part] = max(self.errors.get(part, 0.0), err)


# --- one rank (run by convert_pool, in this process or a worker) -------------------------------------

_CKPTS: dict = {}  # open checkpoints of this process, by (source, preset)


def convert_rank(job: dict) -> dict:
    """Write rank file `job['rank']` into `job['dir']`; returns bytes, sha256, requant errors."""
    from grok_deploy.checkpoint import open_checkpoint

    key = (job["src"], job["preset"].name)
    if key not in _CKPTS:
        _CKPTS[key] = open_checkpoint(job["src"], preset=job["preset"])
    ckpt = _CKPTS[key]
    m, rank = Mapping.from_dict(job["mapping"]), job["rank"]
    specs = rank_specs(ckpt.config, m, rank, job["quant"], job["dtype"])
    path = Path(job["dir"]) / tn.rank_file(rank)
    writer = RankWriter(path, specs, {"format": "pt"})
    producer = RankProducer(ckpt, m, rank, job["quant"], job["dtype"])
    try:
        pending = writer.size - sum(s.nbytes for s in specs)  # the header
        for name, chunk in producer:
            if chunk.dtype != np.int8 and not np.isfinite(chunk).all():
                bad = int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
                raise UserError(f"{job['src']}: {bad} non-finite values (NaN or inf) going into {name} of rank "
                                f"{rank}; the checkpoint is corrupt (`grok-deploy inspect` names the tensors); "
                                "download it again")
            writer.write(name, chunk)
            pending += chunk.nbytes
            if pending >= REPORT_BYTES:
                report(pending)
                pending = 0
        sha = writer.close()
        report(pending)
    except BaseException:
        writer.abort()
        raise
    return {"file": path.name, "bytes": writer.size, "sha256": sha, "errors": producer.errors}


# --- the stage ---------------------------------------------------------------------------------------

def _progress_bar(total: int, enabled: bool):
    from grok_deploy.progress import Progress  # bytes, rate and ETA on stderr (off when not a terminal)
    return Progress(total, "convert", show=None if enabled else False)


def convert(src, out, tp: int, moe_tp: int | None = None, moe_ep: int | None = None, pp: int = 1,
            quant: str = "w8a16", dtype: str = "bfloat16", workers: int | None = None,
            progress: bool = True, preset: str | None = None) -> dict:
    """Convert checkpoint `src` into the TensorRT-LLM checkpoint folder `out`; returns its manifest.

    `out` may not overlap `src` and must be absent, empty or an earlier conversion."""
    from grok_deploy.checkpoint import open_checkpoint

    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
    ckpt = open_checkpoint(src, preset=preset)
    cfg = ckpt.config
    m = Mapping(tp, pp, moe_tp, moe_ep)
    problems = m.problems(cfg)
    if problems:
        raise UserError("cannot shard this way: " + "; ".join(problems))
    out = Path(out)
    check_output(out, ckpt.path, "convert")
    workers = max(1, min(m.world, workers or os.cpu_count() or 1))
    requant = requantized_parts(cfg, m, quant, ckpt.format)
    total = sum(s.nbytes for r in range(m.world) for s in rank_specs(cfg, m, r, quant, dtype))
    t0 = time.perf_counter()
    clean_stale(out)
    check_space(out, total, f"the TensorRT-LLM checkpoint (tp {m.tp}, {quant}, {dtype})")
    tmp = new_tmp(out, "convert")
    try:
        config = trtllm_config(cfg, m, quant, dtype)
        config_bytes = (json.dumps(config, indent=2) + "\n").encode()
        (tmp / "config.json").write_bytes(config_bytes)
        jobs = [{"src": str(src), "preset": cfg, "dir": str(tmp), "mapping": m.to_dict(),
                 "rank": r, "quant": quant, "dtype": dtype} for r in range(m.world)]
        with _progress_bar(total, progress) as bar:
            results = run_ranks(convert_rank, jobs, workers, lambda n: bar.update(n, items=0))
        manifest = _manifest(src, ckpt, m, quant, dtype, requant, workers, t0, config_bytes, results)
        commit(tmp, out, manifest)  # manifest.json last
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    errors = manifest["requant_errors"]
    if errors:
        why = ("the release's 8 K-block scales do not line up with this split" if ckpt.format == "xai"
               else "the source is not int8")
        print(f"requantised per output channel ({why}): {', '.join(sorted(errors))}; largest error "
              f"introduced {manifest['requant_max_abs_error']:.3e}", file=sys.stderr)
    return manifest


def _manifest(src, ckpt, m: Mapping, quant, dtype, requant, workers, t0, config_bytes, results) -> dict:
    from grok_deploy import __version__

    cfg = ckpt.config
    errors: dict[str, float] = {}
    for res in results:
        for part, err in res.pop("errors").items():
            errors[part] = max(errors.get(part, 0.0), err)
    return {
        "produced_by": "grok-deploy convert", "version": __version__, "source": str(Path(src).resolve()),
        "source_format": ckpt.format, "config": cfg.name, "mapping": m.to_dict(),
        "quant": quant, "dtype": dtype,
        "preprocessed": False,  # raw [in, out] int8: build.py applies TensorRT-LLM's preprocessing
        "weight_layout": "[in, out] int8 + per_channel_scale" if quant == "w8a16" else "[out, in]",
        "requantized": requant, "requant_max_abs_error": max(errors.values(), default=0.0),
        "requant_errors": errors, "workers": workers,
        "seconds": round(time.perf_counter() - t0, 3), "bytes": sum(r["bytes"] for r in results),
        "files": {"config.json": {"bytes": len(config_bytes),
                                  "sha256": hashlib.sha256(config_bytes).hexdigest()},
                  **{r["file"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in results}},
    }


def cli_convert(args) -> int:
    from grok_deploy.safe_files import lock

    if args.quant == "w8a16" and args.dtype == "float32":  # refused before anything is written
        from grok_deploy.trtllm.compat import W8A16_FLOAT32

        raise UserError(f"--dtype: {W8A16_FLOAT32}")
    with lock(Path(os.path.abspath(args.out)).parent, f"grok-deploy convert {args.out}"):
        man = convert(args.ckpt, args.out, args.tp, args.moe_tp, args.moe_ep, args.pp, args.quant,
                      args.dtype, args.workers, progress=True, preset=getattr(args, "preset", None))
    mp = man["mapping"]
    print(f"wrote {args.out}: {mp['world_size']} rank files (tp {mp['tp_size']}, moe_tp "
          f"{mp['moe_tp_size']}, moe_ep {mp['moe_ep_size']}, pp {mp['pp_size']}), "
          f"{man['bytes'] / 1e9:.3f} GB in {man['seconds']:.1f} s")
    return 0
