"""check-shards: the TensorRT-LLM rank files checked against the source, layer by layer.

The work is trtllm/check_stream.py (layer-streamed, bounded memory: one expert at a time, one
gloo process per rank reading only its own file). This module keeps the stage entry, the CLI,
the rank-file layout audit and the estimate `plan` prints (torch-free); the per-element
tolerance of a rank tensor against the source is trtllm/tolerance.py (0 where the values are
copied, the dtype's rounding where cast, half a step of the stored scale where requantised).
check_stream imports nothing from here (no import circle). The sharded run is compared with the
reference run on the same effective weights (what the rank files hold), which must agree to
float32 rounding; what quantisation changed is reported apart.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from grok_deploy.errors import UserError
from grok_deploy.trtllm import names as tn
from grok_deploy.trtllm.shard import Mapping

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


def _spawn(entry, job: dict, world: int, timeout: float) -> None:
    import multiprocessing

    import torch.multiprocessing as tmp

    # a fork server that has imported torch once forks the ranks: no per-rank torch import, and no
    # fork of this process (which may hold OpenMP threads)
    multiprocessing.set_forkserver_preload(["grok_deploy.trtllm.check_stream"])
    ctx = tmp.start_processes(entry, args=(job,), nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"check-shards: the {world} rank processes did not finish within {timeout:.0f} s")


# --- the estimate `plan` prints ---------------------------------------------------------------------

# Measured by bench/verify_fullsize.py (Grok-1 width, 2 layers, tp 8 W8A16, the 13-token shards
# prompt) on this project's 2-core host (host.REFERENCE), quiet, page cache emptied first, disk read
# at 1.58 GB/s (2026-12-08): per layer the audit 8.3 s, the reference passes 2.4 s (source) and
# 5.3 s (effective weights), the ranks 2.5 s (their files still cached from the audit: the rate is
# the reference disk's); the embedding, lm_head and process starts 38 s; 6.8 GB for all processes
# together, each rank 0.86 GB (~0.25 GB plus its lm_head slice, bf16 read and f32 copy, at the
# final logits). The rates are host.REFERENCE's with its disk at host.REF_DISK_BPS;
# host.Host.scale carries each term over to another host.
AUDIT_BPS = 0.61e9     # bytes of source + rank files compared per second (mostly reading them)
PASS_BPS = 0.63e9      # a reference pass (source, effective weights): stored layer bytes per second
RANKS_BPS = 0.7e9      # the rank processes together (their slices add up to one layer)
START_S = 1.5         # starting a process that imports torch (2 cores)
RANK_BASE = 0.25e9     # a rank process: interpreter, torch, gloo, one expert slice


def check_estimate(cfg, m: Mapping, quant: str, host=None) -> dict:
    """Peak host memory (all processes together) and time of the streamed check of a TensorRT-LLM
    checkpoint of `cfg` (a GrokConfig) sharded as `m`, on the 13-token shards prompt, on `host`
    (a host.Host; default: this one's cores, the reference disk) (pure; no files, no torch:
    `plan` prints it)."""
    from grok_deploy.host import current

    host = host or current()
    d, f, e, v = cfg.emb_size, cfg.ffn_size, cfg.num_experts, cfg.vocab_size
    w = 1 if quant == "w8a16" else 2  # bytes per stored matrix weight in the rank files
    layer = e * 3 * d * f + 2 * cfg.q_size * d + 2 * cfg.kv_size * d  # int8 source bytes of a layer
    emb_src, emb_rank = v * d * 4, v * d * 2                       # f32 in the release, bf16 copies
    audited = cfg.num_layers * layer * (1 + w) + emb_src + (m.tp + 1) * emb_rank
    rank_bytes, pass_bytes = cfg.num_layers * layer * w + emb_rank, cfg.num_layers * layer * 2
    ranks = host.scale(rank_bytes / RANKS_BPS, rank_bytes) + host.scale(START_S * m.world)
    seconds = (host.scale(audited / AUDIT_BPS, audited) + host.scale(pass_bytes / PASS_BPS, pass_bytes) + ranks
               + host.scale(4 * emb_src / PASS_BPS, 4 * emb_src)  # two logits passes over the table
               + host.scale(START_S))
    lm_slice = v // m.tp * d * 6  # a rank's lm_head slice: bf16 read + f32 copy
    parent = 0.5e9 + 3 * d * f * (1 + w) + 8192 * d * 4 * 3  # an expert's source + rank bytes, row blocks
    return {"processes": m.world + 1, "peak_bytes": int(max(parent, 0.3e9 + m.world * (RANK_BASE + lm_slice))),
            "seconds": seconds, "ranks_seconds": ranks, "bytes_read": int(audited + cfg.num_layers * layer * (2 + w) + 4 * emb_src)}


# --- the stage -------------------------------------------------------------------------------------------

def check_shards(trtllm_dir, source, prompt: str, max_tokens: int = 8, timeout: float | None = None,
                 preset: str | None = None, launch=None) -> dict:
    """Check the rank files of `trtllm_dir` against the source checkpoint `source`, streamed layer
    by layer (check_stream.py), on the prompt. Returns the result; result["ok"] is False on any
    mismatch. `max_tokens` is kept for the CLI's compatibility: the check is teacher-forced on
    the prompt and generates nothing. `timeout`: seconds the rank processes may take (default: 300 s
    plus three times check_estimate's figure for them, ~10 min at Grok-1's size on 2
    cores). `launch(job, world, timeout)` starts the rank processes
    (default: local processes; trtllm.mpi.mpirun_launcher: under mpirun with a hostfile)."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.model.tokenizer import fit_context, load_tokenizer
    from grok_deploy.trtllm.check_stream import check_streamed
    from grok_deploy.trtllm.convert import rank_specs, requantized_parts
    from grok_deploy.trtllm.safetensors_writer import read_header

    trtllm_dir = Path(trtllm_dir)
    try:
        config = json.loads((trtllm_dir / "config.json").read_text())
        m = Mapping.from_dict(config["mapping"])
        quant = "w8a16" if config["quantization"]["quant_algo"] == "W8A16" else "none"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{trtllm_dir / 'config.json'}: missing or not a TensorRT-LLM checkpoint config ({e})")
    headers = [read_header(trtllm_dir / tn.rank_file(r)) for r in range(m.world)]  # missing/truncated -> UserError
    ckpt = open_checkpoint(source, preset=preset)
    cfg = ckpt.config
    if (cfg.emb_size, cfg.num_layers, cfg.vocab_size) != (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]):
        raise UserError(f"{trtllm_dir}: converted from a different model than {source} ({cfg.name})")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    prompt_ids = load_tokenizer(ckpt.tokenizer_path).encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt encodes to no tokens; give a non-empty prompt")
    prompt_ids = fit_context(prompt_ids, cfg.sequence_len, "--prompt")
    layout = [p for r in range(m.world)
              for p in audit_layout(headers[r], rank_specs(cfg, m, r, quant, config["dtype"]), tn.rank_file(r))]
    if layout:  # names, shapes or dtypes wrong: the values cannot be read as this layout
        return {"world_size": m.world, "ok": False, "tokens_match": False, "max_abs_logit_diff": float("nan"),
                "tolerance": 0.0, "tensor_mismatches": layout, "mapping": m.to_dict(), "quant": quant}
    if timeout is None:
        timeout = 300.0 + 3 * check_estimate(cfg, m, quant)["ranks_seconds"]
    spawn = _spawn if launch is None else (lambda entry, job, world, t: launch(job, world, t))
    return check_streamed(trtllm_dir, ckpt, config, m, quant, prompt_ids,
                          requantized_parts(cfg, m, quant, ckpt.format), timeout, spawn)


def cli_check_shards(args) -> int:
    res = check_shards(args.trtllm_dir, args.source, args.prompt, args.max_tokens)
    if args.json:
        print(json.dumps(res))
    else:
        verdict = "PASS" if res["ok"] else "FAIL"
        print(f"{verdict}: world {res['world_size']}, sharded vs effective weights: tokens match "
              f"{res['tokens_match']}, max |logit diff| {res['max_abs_logit_diff']:.3e} (tolerance "
              f"{res['tolerance']:.1e}), {len(res['tensor_mismatches'])} tensor mismatches")
        for p in res["tensor_mismatches"][:20]:
            extra = f" experts {p['experts']}" if p.get("experts") else ""
            print(f"  {p['file']}: {p['tensor']}: {p['problem']}{extra}")
        if res.get("first_mismatch"):
            f = res["first_mismatch"]
            print(f"  first disagreeing layer {f['layer']} ({f['branch']}: {', '.join(f['tensors'])} in "
                  f"{', '.join(f['files'])}): {f['max_abs_diff']:.3e} > {f['tolerance']:.1e}")
        if "quantization" in res:
            q = res["quantization"]
            print(f"  quantisation (reported, not judged): max relative weight error {q['max_rel_weight_error']:.2e}, "
                  f"logit change {q['logit_change']:.3e}, argmax same as the source: {q['argmax_same_as_source']}")
    return 0 if res["ok"] else 1
