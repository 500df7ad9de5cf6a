"""check-shards: run a TensorRT-LLM checkpoint with torch.distributed and compare with the reference.

One process per rank (world = tp x pp, gloo on 127.0.0.1), each reading only its own rank file
(and the source checkpoint, to audit its tensors). The math is the reference model's
(grok_deploy.model.grok building blocks) in float32, W8A16 weights dequantised on the fly:
- attention.dense and the MoE (moe_tp partial sums and moe_ep expert subsets) are all-reduced
  over the TP group; lm_head vocab shards are all-gathered;
- pipeline stages pass hidden states with send/recv; the last stage broadcasts each new token.
Each rank also checks every tensor of its file against what the source implies (the pure
functions of shard.py applied to the dequantised source), so a wrong tensor is named, not just
seen as a logit difference.

Logit tolerance (in the result as "tolerance"): EXACT_ATOL = 1e-3 absolute where the rank
weights are exactly the source's (dtype float32 with the release's int8 kept, or --quant none in
float32); otherwise LOOSE_RTOL = 1% of max |reference logit|, which covers bf16/f16 storage of
norms and embeddings and per-channel requantisation. On grok-1-tiny (max |logit| about 19, so a
tolerance of 0.19) the measured differences are: exact layouts < 1e-5, requantised float32
0.03-0.06, bfloat16 storage 0.04-0.07.
"""
from __future__ import annotations

import json
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from grok_deploy.errors import UserError
from grok_deploy.model import names
from grok_deploy.trtllm import names as tn
from grok_deploy.trtllm import shard
from grok_deploy.trtllm.shard import Mapping

EXACT_ATOL = 1e-3
LOOSE_RTOL = 0.01
# relative rounding of a value stored in each dtype (round to nearest)
DTYPE_RTOL = {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


# --- rank weights (float32, [in, out]) --------------------------------------------------------------

def load_rank(path: Path, quant: str) -> dict:
    """All tensors of a rank file as float32 torch tensors; matrices as [in, out] (expert first),
    W8A16 dequantised (codes x per-channel scale); `<name>.per_channel_scale` kept for tolerances."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            t = f.get_tensor(key)
            if key.endswith(tn.WEIGHT) and key[: -len(tn.WEIGHT)] + tn.SCALE in keys:
                scale = f.get_tensor(key[: -len(tn.WEIGHT)] + tn.SCALE).float()
                out[key] = t.float() * scale[..., None, :]
            elif any(key.endswith(m + tn.WEIGHT) for m in tn.MATRICES) and quant == "none":
                out[key] = t.float().transpose(-1, -2).contiguous()
            else:
                out[key] = t.float()
    return out


def expected_tensors(ckpt, m: Mapping, rank: int):
    """(name, float32 array) of every weight of `rank` in load_rank's layout, from the source."""
    cfg = ckpt.config
    tp_r, mtp_r, ep_r = m.tp_rank(rank), m.moe_tp_rank(rank), m.moe_ep_rank(rank)
    if m.pp_rank(rank) == 0:
        yield tn.VOCAB_EMBEDDING, ckpt.read(names.EMBEDDING)
    for local, layer in enumerate(m.layers(rank, cfg.num_layers)):
        def leaf(x):
            return ckpt.read(names.layer_path(layer, x))

        def experts(x):
            return shard.split_experts(leaf(x), ep_r, m.moe_ep)
        pre = tn.LAYER_PREFIX.format(layer=local)
        for part, src in tn.NORMS.items():
            yield pre + part, leaf(src)
        yield pre + tn.ROUTER, leaf(tn.ROUTER_LEAF).T
        yield pre + tn.QKV + tn.WEIGHT, shard.fuse_qkv(*(leaf(x) for x in tn.MATRICES[tn.QKV]), tp_r, m.tp)
        yield pre + tn.DENSE + tn.WEIGHT, shard.split_rows(leaf(tn.MATRICES[tn.DENSE][0]), tp_r, m.tp)
        yield pre + tn.FC + tn.WEIGHT, shard.fuse_fc(*(experts(x) for x in tn.MATRICES[tn.FC]), mtp_r, m.moe_tp)
        yield pre + tn.PROJ + tn.WEIGHT, shard.split_rows(experts(tn.MATRICES[tn.PROJ][0]), mtp_r, m.moe_tp)
    if m.pp_rank(rank) == m.pp - 1:
        yield tn.LN_F, ckpt.read(names.FINAL_NORM)
        yield tn.LM_HEAD, shard.split_axis(ckpt.read(names.EMBEDDING), tp_r, m.tp, 0)


def _tolerance(name, part, exp, scales, quant, dtype, requantized) -> np.ndarray:
    """Allowed |rank value - source value| per element."""
    if part and quant == "w8a16" and part in requantized:
        return 0.5 * 1.01 * scales[name][..., None, :].numpy()  # half a step of the stored scale
    if part and quant == "w8a16":  # the release's codes; scales exact in bf16 and f32
        return np.abs(exp) * (DTYPE_RTOL["float16"] if dtype == "float16" else 0.0)
    if name.endswith(tn.ROUTER):
        return np.zeros_like(exp)  # float32 always
    return np.abs(exp) * DTYPE_RTOL[dtype] + (6e-8 if dtype == "float16" else 0.0)  # f16 subnormals


def audit_layout(header: dict, specs, file: str) -> list[dict]:
    """Names, shapes and dtypes of a rank file's header against convert.rank_specs."""
    out = []
    want = {s.name: (list(s.shape), tn.ST_DTYPES[s.dtype]) for s in specs}
    got = {k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            problem = ("missing" if name not in got else "unexpected tensor" if name not in want
                       else f"{got[name][1]} {got[name][0]}, expected {want[name][1]} {want[name][0]}")
            out.append({"file": file, "tensor": name, "problem": problem})
    return out


def audit_rank(weights: dict, scales: dict, ckpt, m: Mapping, rank: int, quant: str, dtype: str,
               requantized: list[str]) -> list[dict]:
    """Every weight of the rank against the source values (names, shapes and dtypes are
    audit_layout's); a mismatch names the file, the tensor and, for MoE tensors, the experts."""
    out = []
    file = tn.rank_file(rank)
    for name, exp in expected_tensors(ckpt, m, rank):
        got = weights.get(name)
        if got is None:
            continue  # reported by audit_layout
        got = got.numpy()
        exp = np.asarray(exp, np.float32)
        if got.shape != exp.shape:
            out.append({"file": file, "tensor": name, "problem": f"shape {list(got.shape)}, expected {list(exp.shape)}"})
            continue
        part = next((p for p in tn.MATRICES if name.endswith(p + tn.WEIGHT)), None)
        tol = _tolerance(name, part, exp, scales, quant, dtype, requantized)
        diff = np.abs(got - exp)
        if np.any(diff > tol):
            rec = {"file": file, "tensor": name, "max_abs_diff": float(diff.max()),
                   "problem": "values differ from what the source implies"}
            if part in tn.EXPERT_MATRICES:
                bad = np.nonzero((diff > tol).reshape(diff.shape[0], -1).any(-1))[0]
                first = m.experts(rank, ckpt.config.num_experts)[0]
                rec["experts"] = [int(first + i) for i in bad]
            out.append(rec)
    return out


# --- the distributed run ----------------------------------------------------------------------------

class RankModel:
    """One rank's share of the model; forward() does its layers and the collectives."""

    def __init__(self, w: dict, cfg: dict, m: Mapping, rank: int, groups: list):
        from grok_deploy.model.grok import bf16_const

        self.w, self.m, self.rank = w, m, rank
        self.tp_group = groups[m.pp_rank(rank)]
        self.first, self.last = m.pp_rank(rank) == 0, m.pp_rank(rank) == m.pp - 1
        self.n_layers = cfg["num_hidden_layers"] // m.pp
        self.hq, self.hkv = cfg["num_attention_heads"] // m.tp, cfg["num_key_value_heads"] // m.tp
        self.dk, self.d = cfg["head_size"], cfg["hidden_size"]
        self.eps, self.base, self.k = cfg["norm_epsilon"], cfg["rotary_base"], cfg["moe_top_k"]
        self.scale, self.cap = self.dk ** -0.5, cfg["max_attn_value"]
        self.emb_mult = bf16_const(cfg["embedding_multiplier_scale"])  # as the reference
        self.out_mult = bf16_const(cfg["output_multiplier_scale"])
        self.experts = m.experts(rank, cfg["moe_num_experts"])

    def new_cache(self, max_len: int) -> None:
        shape = (1, max_len, self.hkv, self.dk)  # (B, S, Hkv / T, dk)
        self.kc = [torch.zeros(shape) for _ in range(self.n_layers)]
        self.vc = [torch.zeros(shape) for _ in range(self.n_layers)]

    def forward(self, tokens, start: int):
        """tokens (1, T) at positions start..; returns f32 logits (T, V) on the last stage."""
        from grok_deploy.model.grok import attention_core, moe_sparse, rms_norm, rope, rope_tables

        w, m = self.w, self.m
        n = tokens.shape[1]
        if self.first:
            h = w[tn.VOCAB_EMBEDDING][tokens] * self.emb_mult  # (1, T, D)
        else:
            h = torch.empty(1, n, self.d)
            dist.recv(h, src=self.rank - m.tp)
        pos = start + torch.arange(n)[None]  # (1, T)
        cos, sin = rope_tables(pos, self.dk, self.base)
        mask = (torch.arange(self.kc[0].shape[1])[None, None] <= pos[:, :, None])  # (1, T, S)
        nq, nkv = self.hq * self.dk, self.hkv * self.dk
        for i in range(self.n_layers):
            p = tn.LAYER_PREFIX.format(layer=i)
            x = rms_norm(h, w[p + "input_layernorm.weight"], self.eps)
            qkv = x @ w[p + tn.QKV + tn.WEIGHT]  # (1, T, nq + 2 nkv): [Q_r | K_r | V_r]
            q = rope(qkv[..., :nq].reshape(1, n, self.hq, self.dk), cos, sin)
            k = rope(qkv[..., nq:nq + nkv].reshape(1, n, self.hkv, self.dk), cos, sin)
            self.kc[i][:, start:start + n] = k
            self.vc[i][:, start:start + n] = qkv[..., nq + nkv:].reshape(1, n, self.hkv, self.dk)
            a = attention_core(q, self.kc[i], self.vc[i], mask, self.scale, self.cap)
            a = a @ w[p + tn.DENSE + tn.WEIGHT]  # row-parallel partial sum
            dist.all_reduce(a, group=self.tp_group)
            h = h + rms_norm(a, w[p + "post_attn_layernorm.weight"], self.eps)
            x = rms_norm(h, w[p + "post_layernorm.weight"], self.eps).reshape(n, self.d)
            fc = w[p + tn.FC + tn.WEIGHT]  # (E_local, D, 2 F_r): [linear_v | linear]
            half = fc.shape[-1] // 2
            mo = moe_sparse(x, w[p + tn.ROUTER].T, fc[..., half:], fc[..., :half],
                            w[p + tn.PROJ + tn.WEIGHT], self.k, experts=self.experts)
            dist.all_reduce(mo, group=self.tp_group)  # sums moe_tp slices and moe_ep experts
            h = h + rms_norm(mo.reshape(1, n, self.d), w[p + "post_mlp_layernorm.weight"], self.eps)
        if not self.last:
            dist.send(h.contiguous(), dst=self.rank + m.tp)
            return None
        h = rms_norm(h, w[tn.LN_F], self.eps)[0]
        part = (h @ w[tn.LM_HEAD].T).contiguous()  # (T, V/T)
        parts = [torch.empty_like(part) for _ in range(m.tp)]
        dist.all_gather(parts, part, group=self.tp_group)
        return torch.cat(parts, -1) * self.out_mult


def _rank_main(index: int, job: dict) -> None:
    """Entry point of rank `index`: audit its file, then greedy decode with the others."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.trtllm.convert import rank_specs
    from grok_deploy.trtllm.safetensors_writer import read_header

    torch.set_num_threads(1)
    m, rank, world = Mapping.from_dict(job["mapping"]), index, job["world"]
    dist.init_process_group("gloo", init_method=f"tcp://{job.get('master_addr', '127.0.0.1')}:{job['port']}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=job["timeout"]))
    try:
        groups = [dist.new_group(list(range(p * m.tp, (p + 1) * m.tp))) for p in range(m.pp)]
        path = Path(job["dir"]) / tn.rank_file(rank)
        w = load_rank(path, job["quant"])
        scales = {k[: -len(tn.SCALE)] + tn.WEIGHT: v for k, v in w.items() if k.endswith(tn.SCALE)}
        w = {k: v for k, v in w.items() if not k.endswith(tn.SCALE)}
        ckpt = open_checkpoint(job["source"], preset=job["preset"])
        specs = rank_specs(ckpt.config, m, rank, job["quant"], job["dtype"])
        problems = audit_layout(read_header(path), specs, path.name)
        problems += audit_rank(w, scales, ckpt, m, rank, job["quant"], job["dtype"], job["requantized"])
        del ckpt
        model = RankModel(w, job["config"], m, rank, groups)
        model.new_cache(len(job["prompt_ids"]) + job["max_tokens"])
        reporter = (m.pp - 1) * m.tp  # tp rank 0 of the last stage
        tokens, start, out, logits = torch.tensor([job["prompt_ids"]]), 0, [], []
        with torch.no_grad():
            for _ in range(job["max_tokens"]):
                step = model.forward(tokens, start)
                nxt = torch.zeros(1, dtype=torch.long)
                if step is not None:
                    logits.append(step[-1].numpy())
                    nxt[0] = step[-1].argmax()
                dist.broadcast(nxt, src=reporter)
                start += tokens.shape[1]
                tokens = nxt[None]
                out.append(int(nxt))
        res = {"rank": rank, "problems": problems}
        if rank == reporter:
            res["tokens"] = out
            np.save(Path(job["results"]) / "logits.npy", np.stack(logits))
        (Path(job["results"]) / f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(job: dict, world: int, timeout: float) -> None:
    import multiprocessing

    import torch.multiprocessing as tmp

    # a fork server that has imported torch once forks the ranks: no per-rank torch import, and no
    # fork of this process (which may hold OpenMP threads)
    multiprocessing.set_forkserver_preload([__name__])
    ctx = tmp.start_processes(_rank_main, args=(job,), nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"check-shards: the {world} rank processes did not finish within {timeout:.0f} s")


# --- the stage -------------------------------------------------------------------------------------------

def check_shards(trtllm_dir, source, prompt: str, max_tokens: int = 8, timeout: float = 300.0,
                 preset: str | None = None, launch=None) -> dict:
    """Run the rank files of `trtllm_dir` (one process each) and compare with the reference run on
    `source`. Returns the result; result["ok"] is False on any mismatch. `launch(job, world,
    timeout)` starts the ranks (default: local processes; trtllm.mpi.mpirun_launcher: mpirun)."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.model.generate import generate, load_model
    from grok_deploy.model.tokenizer import load_tokenizer
    from grok_deploy.trtllm.convert import requantized_parts
    from grok_deploy.trtllm.safetensors_writer import read_header

    trtllm_dir = Path(trtllm_dir)
    try:
        config = json.loads((trtllm_dir / "config.json").read_text())
        m = Mapping.from_dict(config["mapping"])
        quant = "w8a16" if config["quantization"]["quant_algo"] == "W8A16" else "none"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{trtllm_dir / 'config.json'}: missing or not a TensorRT-LLM checkpoint config ({e})")
    for r in range(m.world):
        read_header(trtllm_dir / tn.rank_file(r))  # missing or truncated rank file -> UserError
    ckpt = open_checkpoint(source, preset=preset)
    cfg = ckpt.config
    if (cfg.emb_size, cfg.num_layers, cfg.vocab_size) != (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]):
        raise UserError(f"{trtllm_dir}: converted from a different model than {source} ({cfg.name})")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    prompt_ids = load_tokenizer(ckpt.tokenizer_path).encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt encodes to no tokens; give a non-empty prompt")
    ref = generate(load_model(ckpt), [prompt_ids], max_tokens, return_logits=True)
    ref_ids, ref_logits = ref.output_ids[0], ref.logits[0]
    requant = requantized_parts(cfg, m, quant, ckpt.format)
    dtype = config["dtype"]
    exact = dtype == "float32" and not requant
    with tempfile.TemporaryDirectory(prefix="check-shards-") as results:
        job = {"mapping": m.to_dict(), "world": m.world, "port": _free_port(), "timeout": timeout,
               "dir": str(trtllm_dir), "source": str(source), "preset": cfg, "quant": quant,
               "dtype": dtype, "requantized": requant, "config": config, "prompt_ids": prompt_ids,
               "max_tokens": max_tokens, "results": results}
        t0 = time.perf_counter()
        (launch or _spawn)(job, m.world, timeout)
        ranks = [json.loads((Path(results) / f"rank{r}.json").read_text()) for r in range(m.world)]
        logits = np.load(Path(results) / "logits.npy")
    ids = next(r["tokens"] for r in ranks if "tokens" in r)
    same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), len(ids))
    steps = min(same + 1, len(ids))  # logits are comparable up to the first differing token
    diff = float(np.abs(logits[:steps] - ref_logits[:steps]).max())
    tol = EXACT_ATOL if exact else max(EXACT_ATOL, LOOSE_RTOL * float(np.abs(ref_logits).max()))
    problems = [p for r in ranks for p in r["problems"]]
    tokens_match = ids == ref_ids
    return {
        "world_size": m.world, "max_abs_logit_diff": diff, "tokens_match": tokens_match,
        "ok": tokens_match and diff <= tol and not problems, "tolerance": tol,
        "exact_weights": exact, "mapping": m.to_dict(), "quant": quant, "dtype": dtype,
        "requantized": requant, "tensor_mismatches": problems, "prompt_ids": prompt_ids,
        "reference_ids": ref_ids, "sharded_ids": ids, "steps_compared": steps,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def cli_check_shards(args) -> int:
    res = check_shards(args.trtllm_dir, args.source, args.prompt, args.max_tokens)
    if args.json:
        print(json.dumps(res))
    else:
        verdict = "PASS" if res["ok"] else "FAIL"
        print(f"{verdict}: world {res['world_size']}, tokens match {res['tokens_match']}, max |logit diff| "
              f"{res['max_abs_logit_diff']:.3e} (tolerance {res['tolerance']:.1e}), "
              f"{len(res['tensor_mismatches'])} tensor mismatches")
        for p in res["tensor_mismatches"][:20]:
            extra = f" experts {p['experts']}" if p.get("experts") else ""
            print(f"  {p['file']}: {p['tensor']}: {p['problem']}{extra}")
    return 0 if res["ok"] else 1
