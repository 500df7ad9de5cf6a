"""Layer-streamed check-shards: the rank files checked layer by layer in bounded memory.

Three separate questions, each answered on its own (so a user's checkpoint does not pass or fail
by luck):
1. Do the rank files hold what the source implies? Every tensor of every rank, one expert at a
   time, against the source sharded by shard.py, within a per-element bound: 0 where the values
   are copied, the dtype's rounding where they are cast, half a quantisation step of the stored
   scale where they were requantised (tolerance.py). A mismatch names the file, the
   tensor and the experts.
2. Is the sharding exact? The rank processes (gloo, one per rank) each read only their file's
   slices of a layer and run that layer on the same input activations as the reference run on
   the *effective* weights (the values the rank files hold, re-assembled: `EffectiveSource`).
   Attention and MoE outputs and the final logits must agree to float32 rounding
   (SHARD_RTOL x the largest value); the first layer and tensor that disagree are named.
3. What did quantisation change? Reported, not judged: per tensor the max and relative weight
   error against the source, and the logit change of the effective model against the source.
All three run on the prompt, teacher-forced (one causal pass, no KV cache).
"""
from __future__ import annotations

import json
import socket
import tempfile
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig
from grok_deploy.model.quantized import ColumnConcat, QuantizedMatrix, RowConcat, columns, over_array
from grok_deploy.trtllm import names as tn
from grok_deploy.trtllm import shard
from grok_deploy.trtllm.shard import Mapping
from grok_deploy.trtllm.tolerance import tolerance

SHARD_RTOL = 1e-4   # float32 sums in another order: relative to the largest |value| of the tensor
NORM_ATTR = {"input_layernorm.weight": "norm0", "post_attn_layernorm.weight": "norm1",
             "post_layernorm.weight": "norm2", "post_mlp_layernorm.weight": "norm3"}
BRANCH_TENSORS = {"attention": f"{tn.QKV}, {tn.DENSE}", "moe": f"{tn.ROUTER}, {tn.FC}, {tn.PROJ}"}


# --- the rank files, read a tensor (or one expert) at a time -------------------------------------

class RankFiles:
    """Tensors of the rank files as float32 in load_rank's layout ([in, out], experts first,
    W8A16 dequantised as codes x per-channel scale), read only when asked for; `raw` gives them
    as stored."""

    def __init__(self, root: Path, quant: str):
        self.root, self.quant, self.bytes_read = Path(root), quant, 0
        self._keys: dict[int, set[str]] = {}

    def _open(self, rank: int):
        from safetensors import safe_open

        return safe_open(str(self.root / tn.rank_file(rank)), framework="pt")

    def keys(self, rank: int) -> set[str]:
        if rank not in self._keys:
            with self._open(rank) as f:
                self._keys[rank] = set(f.keys())
        return self._keys[rank]

    def raw(self, rank: int, name: str, index: int | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` of rank `rank` as stored (dtype, layout); `index`: one expert of a stacked
        tensor; `rows`: a row range."""
        with self._open(rank) as f:
            sl = f.get_slice(name)
            t = sl[index] if index is not None else sl[rows[0]:rows[1]] if rows else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get(self, rank: int, name: str, index: int | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` of rank `rank` as float32 values; `index`, `rows` as in `raw`."""
        t = self.raw(rank, name, index, rows)
        if not name.endswith(tn.WEIGHT):
            return t.float()
        s = self.scale(rank, name, index)
        if s is not None:
            return t.float().mul_(s[..., None, :])
        if self.quant == "none" and any(name.endswith(p + tn.WEIGHT) for p in tn.MATRICES):
            return t.float().transpose(-1, -2).contiguous()  # TensorRT-LLM's [out, in]
        return t.float()

    def matrix(self, rank: int, name: str, index: int | None = None, dtype: torch.dtype = torch.float32):
        """A weight matrix [in, out] (one expert's with `index`): W8A16 as codes x scales that are
        dequantised a block of rows at a time as they are multiplied (model.quantized), else
        float32 values."""
        if self.quant == "w8a16":
            return QuantizedMatrix(self.raw(rank, name, index), self.scale(rank, name, index), dtype)
        return self.get(rank, name, index).to(dtype)

    def scale(self, rank: int, name: str, index: int | None = None) -> torch.Tensor | None:
        key = name[: -len(tn.WEIGHT)] + tn.SCALE
        if key not in self.keys(rank):
            return None
        return self.raw(rank, key, index).float()


def stage_ranks(m: Mapping, layer: int, num_layers: int) -> tuple[list[int], int]:
    """The TP ranks of the pipeline stage holding `layer`, and the layer's local index there."""
    per = num_layers // m.pp
    p = layer // per
    return [p * m.tp + t for t in range(m.tp)], layer - p * per


def expert_ranks(m: Mapping, e: int, num_experts: int) -> tuple[list[int], int]:
    """TP ranks (in moe_tp order) holding expert e, and its local index in their files."""
    per = num_experts // m.moe_ep
    ep = e // per
    return [t for t in range(m.tp) if t % m.moe_ep == ep], e - ep * per


class EffectiveLayer:
    """One layer's weights as the rank files hold them, re-assembled to the canonical layout."""

    def __init__(self, files: RankFiles, m: Mapping, cfg: GrokConfig, layer: int, dtype: torch.dtype):
        self.files, self.m, self.cfg, self.dtype = files, m, cfg, dtype
        ranks, self.local = stage_ranks(m, layer, cfg.num_layers)
        self.stage = ranks
        name = lambda part: tn.layer_name(self.local, part)  # noqa: E731
        for part, attr in NORM_ATTR.items():
            setattr(self, attr, files.get(ranks[0], name(part)))
        self.router = files.get(ranks[0], name(tn.ROUTER)).T.contiguous()  # [E, D] -> [D, E]
        nq, nkv = cfg.q_size // m.tp, cfg.kv_size // m.tp
        qkv = [files.get(r, name(tn.QKV + tn.WEIGHT)) for r in ranks]  # [D, nq + 2 nkv] each
        self.wq = torch.cat([x[:, :nq] for x in qkv], 1).to(dtype)
        self.wk = torch.cat([x[:, nq:nq + nkv] for x in qkv], 1).to(dtype)
        self.wv = torch.cat([x[:, nq + nkv:] for x in qkv], 1).to(dtype)
        self.wo = torch.cat([files.get(r, name(tn.DENSE + tn.WEIGHT)) for r in ranks], 0).to(dtype)

    def expert(self, e: int):
        """(w, v, o) of expert e assembled from its moe_tp slices as the canonical matrices are cut:
        fc_r = [linear_v_r | linear_r] side by side (ColumnConcat), proj_r stacked (RowConcat)."""
        tps, local = expert_ranks(self.m, e, self.cfg.num_experts)
        fc = [self.files.matrix(self.stage[t], tn.layer_name(self.local, tn.FC + tn.WEIGHT), local, self.dtype)
              for t in tps]
        half = fc[0].shape[-1] // 2
        v = ColumnConcat([columns(x, 0, half) for x in fc])
        w = ColumnConcat([columns(x, half, 2 * half) for x in fc])
        o = RowConcat([self.files.matrix(self.stage[t], tn.layer_name(self.local, tn.PROJ + tn.WEIGHT), local, self.dtype)
                       for t in tps])
        return w, v, o


class EffectiveSource:
    """model.stream.WeightSource over the rank files: the model the TensorRT-LLM checkpoint holds."""

    def __init__(self, files: RankFiles, m: Mapping, cfg: GrokConfig):
        self.files, self.m, self.cfg = files, m, cfg
        self.last = [(m.pp - 1) * m.tp + t for t in range(m.tp)]

    def embedding_rows(self, ids):
        return self.files.get(0, tn.VOCAB_EMBEDDING)[ids.long()]  # tokens of a prompt: (N, D)

    def embedding_blocks(self, rows: int):
        per = self.cfg.vocab_size // self.m.tp  # lm_head vocab shards [V/T, D], in rank order
        for t, r in enumerate(self.last):
            for lo in range(0, per, rows):
                yield t * per + lo, self.files.get(r, tn.LM_HEAD, rows=(lo, min(lo + rows, per)))

    def final_norm(self):
        return self.files.get(self.last[0], tn.LN_F)

    def layer(self, i: int, dtype: torch.dtype) -> EffectiveLayer:
        return EffectiveLayer(self.files, self.m, self.cfg, i, dtype)


# --- 1. the rank tensors against the source, streamed ---------------------------------------------

class _Ledger:
    """Problems and per-tensor weight error of the audit, keyed by (file, tensor)."""

    def __init__(self):
        self.bad: dict[tuple[str, str], dict] = {}
        self.err: dict[tuple[str, str], list[float]] = {}  # -> [max abs, sum sq err, sum sq ref]

    def add(self, rank: int, name: str, outcome: dict, expert: int | None = None) -> None:
        key = (tn.rank_file(rank), name)
        if "shape" in outcome:
            self.bad[key] = {"file": key[0], "tensor": name, "problem": outcome["shape"]}
            return
        e = self.err.setdefault(key, [0.0, 0.0, 0.0])
        e[0] = max(e[0], outcome["max"])
        e[1] += outcome["sq_err"]
        e[2] += outcome["sq_ref"]
        if outcome["over"]:
            rec = self.bad.setdefault(key, {"file": key[0], "tensor": name, "max_abs_diff": 0.0,
                                            "problem": "values differ from what the source implies"})
            rec["max_abs_diff"] = max(rec.get("max_abs_diff", 0.0), outcome["max"])
            if expert is not None:
                rec.setdefault("experts", []).append(expert)

    def result(self) -> tuple[list[dict], list[dict]]:
        errors = [{"file": f, "tensor": t, "max_abs_error": e[0],
                   "rel_error": (e[1] / e[2]) ** 0.5 if e[2] else 0.0} for (f, t), e in self.err.items()]
        return list(self.bad.values()), errors


EXACT = {"max": 0.0, "sq_err": 0.0, "sq_ref": 0.0, "over": False}  # bit-identical to the source


def _compare(name, got: torch.Tensor, exp, scale, quant, dtype, requantized) -> dict:
    """One tensor (or expert, or row block) in float32 against its source values, within
    tolerance.tolerance; `got` is consumed (its buffer holds the differences)."""
    exp = torch.as_tensor(np.asarray(exp, np.float32))
    if tuple(got.shape) != tuple(exp.shape):
        return {"shape": f"shape {list(got.shape)}, expected {list(exp.shape)}"}
    part = next((p for p in tn.MATRICES if name.endswith(p + tn.WEIGHT)), None)
    tol = tolerance(name, part, exp.numpy(), {name: scale} if scale is not None else {}, quant, dtype, requantized)
    diff = got.sub_(exp).abs_()
    over = bool((diff > torch.as_tensor(tol)).any()) if np.ndim(tol) else bool(diff.max() > float(tol))
    return {"max": float(diff.max()) if diff.numel() else 0.0, "sq_err": float(torch.dot(diff.ravel(), diff.ravel())),
            "sq_ref": float(torch.dot(exp.ravel(), exp.ravel())), "over": over}


def audit_streamed(ckpt, files: RankFiles, m: Mapping, quant: str, dtype: str, requantized: list[str],
                   layer_seconds: list | None = None) -> tuple[list[dict], list[dict]]:
    """(problems, per-tensor weight error) of every rank tensor against the source, one layer and
    one expert at a time. A problem names file, tensor and (MoE) experts; tensors are named as they are in the rank files.

    Fast paths that decide the same as the float comparison, at a fraction of its cost at
    Grok-1's width: the release's int8 codes kept by convert are compared as codes (bytes) and
    their scales as scales (a column's values are q x s, so equal codes and equal scales are
    equal values; the float comparison runs only where they differ, to measure by how much);
    the replicated copies of a tensor on the other ranks are compared bytewise with the first
    rank's, which alone is compared with the source."""
    cfg = ckpt.config
    ledger = _Ledger()
    raw_codes = quant == "w8a16" and ckpt.format == "xai"

    def check(rank, name, exp, scale=None, expert=None, index=None, rows=None, same_as=None):
        """Rank `rank`'s tensor `name` (an expert `index`, a row range) against `exp`, a float
        array or a callable giving it; `same_as`: (rank, outcome) of a replica already checked."""
        if same_as is not None and torch.equal(files.raw(rank, name, index, rows), files.raw(same_as[0], name, index, rows)):
            ledger.add(rank, name, same_as[1], expert)
            return same_as[1]
        out = _compare(name, files.get(rank, name, index, rows), exp() if callable(exp) else exp, scale,
                       quant, dtype, requantized)
        ledger.add(rank, name, out, expert)
        return out

    def check_codes(rank, name, exp_codes, exp_scale, values, index=None, expert=None):
        """A W8A16 matrix whose codes convert copied: codes and scales compared as stored; the
        float comparison (`values()`: the source's dequantised slice) only where either differs."""
        got = files.raw(rank, name, index)
        scale = files.scale(rank, name, index)
        exp_codes = over_array(exp_codes)
        exp_scale = torch.from_numpy(np.asarray(exp_scale, np.float32).reshape(-1))
        if (got.shape == exp_codes.shape and torch.equal(got, exp_codes) and scale is not None
                and scale.shape == exp_scale.shape and torch.equal(scale, exp_scale)):
            ledger.add(rank, name, EXACT, expert)
            return
        check(rank, name, values, scale, expert, index)

    # global tensors, a block of vocabulary rows at a time
    per = cfg.vocab_size // m.tp
    for lo in range(0, cfg.vocab_size, 8192):
        hi = min(lo + 8192, cfg.vocab_size)
        src = ckpt.read_rows(names.EMBEDDING, lo, hi)
        first = check(0, tn.VOCAB_EMBEDDING, src, rows=(lo, hi))
        for r in range(1, m.tp):  # every rank of the first stage holds a whole copy
            check(r, tn.VOCAB_EMBEDDING, src, rows=(lo, hi), same_as=(0, first))
        for t in range(m.tp):
            a, b = max(lo, t * per), min(hi, (t + 1) * per)
            if a < b:
                r = (m.pp - 1) * m.tp + t
                check(r, tn.LM_HEAD, src[a - lo:b - lo], rows=(a - t * per, b - t * per))
    final = ckpt.read(names.FINAL_NORM)
    for t in range(m.tp):
        check((m.pp - 1) * m.tp + t, tn.LN_F, final)
    for layer in range(cfg.num_layers):
        t0 = time.perf_counter()
        ranks, local = stage_ranks(m, layer, cfg.num_layers)
        path, name = partial(names.layer_path, layer), partial(tn.layer_name, local)
        for part, src in tn.NORMS.items():
            first = check(ranks[0], name(part), ckpt.read(path(src)))
            for r in ranks[1:]:
                check(r, name(part), lambda src=src, path=path: ckpt.read(path(src)), same_as=(ranks[0], first))
        router = ckpt.read(path(tn.ROUTER_LEAF)).T
        first = check(ranks[0], name(tn.ROUTER), router)
        for r in ranks[1:]:
            check(r, name(tn.ROUTER), router, same_as=(ranks[0], first))
        del router
        fast = {p: raw_codes and p not in requantized for p in tn.MATRICES}

        def values(part, slicer, e=None, path=path):  # the source's dequantised values of a rank's slice
            def get():
                leaves = [ckpt.read(path(x)) if e is None else ckpt.read_expert(path(x), e) for x in tn.MATRICES[part]]
                return slicer(*leaves)
            return get

        def raw(part, e=None, path=path):  # the release's (codes, scales) of each leaf of `part`
            out = [ckpt.read_raw(path(x)) for x in tn.MATRICES[part]]
            return [(q.weight, q.scales) if e is None else (q.weight[e], q.scales[e]) for q in out]

        (qw, qs), (kw, ks), (vw, vs) = raw(tn.QKV) if fast[tn.QKV] else [(None, None)] * 3
        ((dw, ds),) = raw(tn.DENSE) if fast[tn.DENSE] else [(None, None)]
        for t, r in enumerate(ranks):
            qkv = lambda *x, t=t: shard.fuse_qkv(*x, t, m.tp)  # noqa: E731
            dense = lambda x, t=t: shard.split_rows(x, t, m.tp)  # noqa: E731
            n = name(tn.QKV + tn.WEIGHT)
            if fast[tn.QKV]:
                check_codes(r, n, qkv(qw, kw, vw), qkv(qs, ks, vs), values(tn.QKV, qkv))
            else:
                check(r, n, values(tn.QKV, qkv), files.scale(r, n))
            n = name(tn.DENSE + tn.WEIGHT)
            if fast[tn.DENSE]:
                block = shard.block_of_slice(dw.shape[0], ds.shape[0], t, m.tp)
                check_codes(r, n, dense(dw), ds[block], values(tn.DENSE, dense))
            else:
                check(r, n, values(tn.DENSE, dense), files.scale(r, n))
        for e in range(cfg.num_experts):  # one expert's source matrices at a time
            tps, idx = expert_ranks(m, e, cfg.num_experts)
            (vw, vs), (ww, ws) = raw(tn.FC, e) if fast[tn.FC] else [(None, None)] * 2
            ((ow, os_),) = raw(tn.PROJ, e) if fast[tn.PROJ] else [(None, None)]
            for t in tps:
                r, mt = ranks[t], m.moe_tp_rank(t)
                fc = lambda v, w, mt=mt: shard.fuse_fc(v, w, mt, m.moe_tp)  # noqa: E731
                proj = lambda o, mt=mt: shard.split_rows(o, mt, m.moe_tp)  # noqa: E731
                n = name(tn.FC + tn.WEIGHT)
                if fast[tn.FC]:
                    check_codes(r, n, fc(vw, ww), fc(vs, ws), values(tn.FC, fc, e), idx, e)
                else:
                    check(r, n, values(tn.FC, fc, e), files.scale(r, n, idx), e, idx)
                n = name(tn.PROJ + tn.WEIGHT)
                if fast[tn.PROJ]:
                    block = shard.block_of_slice(ow.shape[0], os_.shape[0], mt, m.moe_tp)
                    check_codes(r, n, proj(ow), os_[block], values(tn.PROJ, proj, e), idx, e)
                else:
                    check(r, n, values(tn.PROJ, proj, e), files.scale(r, n, idx), e, idx)
        if layer_seconds is not None:
            layer_seconds.append(time.perf_counter() - t0)
    return ledger.result()


# --- 2. the rank processes, one layer at a time ---------------------------------------------------

def _rank_layers_main(index: int, job: dict) -> None:
    """Rank `index`: for each layer of its stage, the layer's input from the parent, its file's
    slices of that layer, the collectives; tp rank 0 of the stage writes the branch outputs."""
    import resource

    from grok_deploy.model.grok import attention_core, moe_streamed, rms_norm, rope, rope_tables
    from grok_deploy.model.stream import causal_mask

    torch.set_num_threads(1)
    m, rank = Mapping.from_dict(job["mapping"]), index
    master = job.get("master_addr", "127.0.0.1")  # the hostfile's first host under mpirun (trtllm/mpi.py)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{job['port']}", rank=rank,
                            world_size=job["world"], timeout=timedelta(seconds=job["timeout"]))
    try:
        groups = [dist.new_group(list(range(p * m.tp, (p + 1) * m.tp))) for p in range(m.pp)]
        group, files, c = groups[m.pp_rank(rank)], RankFiles(Path(job["dir"]), job["quant"]), job["config"]
        inputs, results = Path(job["inputs"]), Path(job["results"])
        hq, hkv, dk, d = c["num_attention_heads"] // m.tp, c["num_key_value_heads"] // m.tp, c["head_size"], c["hidden_size"]
        eps, nq, nkv = c["norm_epsilon"], hq * dk, hkv * dk
        experts = m.experts(rank, c["moe_num_experts"])
        first = experts[0]
        reporter = m.tp_rank(rank) == 0
        seconds = []
        with torch.no_grad():
            for local, layer in enumerate(m.layers(rank, c["num_hidden_layers"])):
                t0 = time.perf_counter()
                p = tn.LAYER_PREFIX.format(layer=local)
                h = torch.load(inputs / f"h{layer}.pt")  # (1, T, D) the effective run's input
                n = h.shape[1]
                cos, sin = rope_tables(torch.arange(n)[None], dk, c["rotary_base"])
                mask = causal_mask(torch.tensor([n]), n)
                x = rms_norm(h, files.get(rank, p + "input_layernorm.weight"), eps)
                qkv = x @ files.get(rank, p + tn.QKV + tn.WEIGHT)  # (1, T, nq + 2 nkv): [Q_r | K_r | V_r]
                q = rope(qkv[..., :nq].reshape(1, n, hq, dk), cos, sin)
                k = rope(qkv[..., nq:nq + nkv].reshape(1, n, hkv, dk), cos, sin)
                v = qkv[..., nq + nkv:].reshape(1, n, hkv, dk)
                a = attention_core(q, k, v, mask, dk ** -0.5, c["max_attn_value"]) @ files.get(rank, p + tn.DENSE + tn.WEIGHT)
                dist.all_reduce(a, group=group)  # row-parallel partial sums
                h = h + rms_norm(a, files.get(rank, p + "post_attn_layernorm.weight"), eps)
                x = rms_norm(h, files.get(rank, p + "post_layernorm.weight"), eps).reshape(n, d)

                def expert(e, p=p):  # this rank's moe_tp slice of expert e, read now, dropped after
                    fc = files.matrix(rank, p + tn.FC + tn.WEIGHT, e - first)  # (D, 2 F_r): [linear_v | linear]
                    half = fc.shape[-1] // 2
                    return columns(fc, half, 2 * half), columns(fc, 0, half), files.matrix(rank, p + tn.PROJ + tn.WEIGHT, e - first)
                mo = moe_streamed(x, files.get(rank, p + tn.ROUTER).T, expert, c["moe_top_k"], experts)
                dist.all_reduce(mo, group=group)  # sums moe_tp slices and moe_ep experts
                if reporter:
                    torch.save({"attention": a, "moe": mo.reshape(1, n, d)}, results / f"s{layer}.pt")
                seconds.append(time.perf_counter() - t0)
            if m.pp_rank(rank) == m.pp - 1:
                h = torch.load(inputs / "final.pt")[0]  # (T, D)
                part = (rms_norm(h, files.get(rank, tn.LN_F), eps) @ files.get(rank, tn.LM_HEAD).T).contiguous()
                parts = [torch.empty_like(part) for _ in range(m.tp)]
                dist.all_gather(parts, part, group=group)
                if reporter:
                    torch.save(torch.cat(parts, -1) * c["output_multiplier_scale"], results / "logits.pt")
        (results / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "layer_seconds": seconds, "bytes_read": files.bytes_read}))
    finally:
        dist.destroy_process_group()


# --- the check -------------------------------------------------------------------------------------

def _max_rel(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref|, the allowed difference SHARD_RTOL x max |ref|)."""
    return float((got - ref).abs().max()), SHARD_RTOL * float(ref.abs().max()) + 1e-6


def check_streamed(trtllm_dir: Path, ckpt, config: dict, m: Mapping, quant: str, prompt_ids: list[int],
                   requant: list[str], timeout: float, spawn) -> dict:
    """The three checks of this module's docstring; returns check_shards' result document."""
    from grok_deploy.checkpoint.stream import CheckpointSource
    from grok_deploy.model.stream import streamed_hidden, streamed_logits

    cfg, dtype = ckpt.config, config["dtype"]
    t0 = time.perf_counter()
    files = RankFiles(trtllm_dir, quant)
    audit_layers: list[float] = []
    problems, weight_errors = audit_streamed(ckpt, files, m, quant, dtype, requant, audit_layers)
    audit_s = time.perf_counter() - t0
    tokens, lengths = torch.tensor([prompt_ids]), torch.tensor([len(prompt_ids)])
    src = CheckpointSource(ckpt)
    src_seconds = []
    logits_src = streamed_logits(cfg, src, streamed_hidden(
        cfg, src, tokens, lengths, on_layer=lambda i, h, s: src_seconds.append(s))[0])
    eff, taps, eff_seconds = EffectiveSource(files, m, cfg), [], []
    h_eff = streamed_hidden(cfg, eff, tokens, lengths, taps=taps, on_layer=lambda i, h, s: eff_seconds.append(s))
    logits_eff = streamed_logits(cfg, eff, h_eff[0])
    with tempfile.TemporaryDirectory(prefix="check-shards-") as tmp:
        inputs, results = Path(tmp) / "in", Path(tmp) / "out"
        inputs.mkdir()
        results.mkdir()
        for i, tap in enumerate(taps):
            torch.save(tap["input"].float().contiguous(), inputs / f"h{i}.pt")
        torch.save(h_eff.float().contiguous(), inputs / "final.pt")
        job = {"mapping": m.to_dict(), "world": m.world, "port": _free_port(), "timeout": timeout,
               "dir": str(trtllm_dir), "quant": quant, "config": config,
               "inputs": str(inputs), "results": str(results)}
        t1 = time.perf_counter()
        spawn(_rank_layers_main, job, m.world, timeout)
        ranks_s = time.perf_counter() - t1
        ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(m.world)]
        sharded = [torch.load(results / f"s{i}.pt") for i in range(cfg.num_layers)]
        logits = torch.load(results / "logits.pt")
    layer_diffs, first_bad = [], None
    for i, (tap, got) in enumerate(zip(taps, sharded)):
        row = {"layer": i}
        for branch in ("attention", "moe"):
            diff, tol = _max_rel(got[branch], tap[branch])
            row[branch] = diff
            if diff > tol and first_bad is None:
                ranks_i, local = stage_ranks(m, i, cfg.num_layers)
                first_bad = {"layer": i, "local_layer": local, "branch": branch,
                             "tensors": [tn.layer_name(local, t.strip()) for t in BRANCH_TENSORS[branch].split(",")],
                             "files": [tn.rank_file(r) for r in ranks_i], "max_abs_diff": diff, "tolerance": tol}
        layer_diffs.append(row)
    diff, tol = _max_rel(logits, logits_eff)
    ids, ids_eff, ids_src = (x.argmax(-1).tolist() for x in (logits, logits_eff, logits_src))
    worst = sorted(weight_errors, key=lambda e: -e["rel_error"])
    return {
        "world_size": m.world, "max_abs_logit_diff": diff, "tolerance": tol, "tokens_match": ids == ids_eff,
        "ok": not problems and first_bad is None and diff <= tol and ids == ids_eff,
        "mapping": m.to_dict(), "quant": quant, "dtype": dtype, "requantized": requant,
        "tensor_mismatches": problems, "first_mismatch": first_bad, "layer_diffs": layer_diffs,
        "prompt_ids": prompt_ids, "sharded_ids": ids, "effective_ids": ids_eff,
        "quantization": {"max_rel_weight_error": max((e["rel_error"] for e in weight_errors), default=0.0),
                         "worst_tensors": worst[:10],
                         "logit_change": float((logits_eff - logits_src).abs().max()),
                         "argmax_same_as_source": ids_eff == ids_src},
        "stats": {"audit_seconds": round(audit_s, 2), "audit_layer_seconds": [round(s, 3) for s in audit_layers],
                  "source_layer_seconds": [round(s, 3) for s in src_seconds],
                  "effective_layer_seconds": [round(s, 3) for s in eff_seconds],
                  "ranks_seconds": round(ranks_s, 2),
                  "rank_layer_seconds": [round(max(r["layer_seconds"][j] for r in ranks if len(r["layer_seconds"]) > j), 3)
                                         for j in range(max(len(r["layer_seconds"]) for r in ranks))],
                  "rank_peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
                  "rank_bytes_read": [r["bytes_read"] for r in ranks],
                  "bytes_read": files.bytes_read + src.bytes_read},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
