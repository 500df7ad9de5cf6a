"""Teacher-forced scoring: the reference's view of every token the server generated.

The served model generates first; the reference then runs prompt + served tokens of all
verification prompts in ONE causal forward pass (no KV cache), streamed layer by layer and
expert by expert from the checkpoint (model.stream, checkpoint.stream). At every generated
position it keeps the reference's top-k ids and logits, its argmax, the top-2 margin, and the
served token's logit and rank (0 = the reference's argmax), so the verdict rule can be applied at
every position, also after a divergence (both sides condition on the same served tokens).

`plan` uses the pure estimates at the bottom (no torch import at module level).
"""
from __future__ import annotations

import os
import resource
import time

import numpy as np

from grok_deploy.host import Host, current
from grok_deploy.verify.reference import TOP_K

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
GB = 1e9


def score(source, prompt_ids: list[list[int]], served_ids: list[list[int]], dtype: str = "float32",
          preset=None, top_k: int = TOP_K, echo=None) -> dict:
    """Score served tokens with the streamed reference. Returns {"prompts": [record], "stats"}; a
    record has per served position: top_ids, top_logits (k), output_ids (argmax), margin,
    served_logit, served_rank; and the full logits (N, V) under "logits" (numpy)."""
    import torch

    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.stream import CheckpointSource
    from grok_deploy.model.stream import streamed_hidden, streamed_logits

    ckpt = open_checkpoint(source, preset=preset)
    cfg = ckpt.config
    src = CheckpointSource(ckpt)
    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    seqs = [list(p) + list(s[:-1]) for p, s in zip(prompt_ids, served_ids)]  # the last token is not an input
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.full((len(seqs), int(lengths.max())), cfg.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    layer_seconds, layer_bytes = [], []

    def on_layer(i, h, seconds):
        layer_seconds.append(seconds)
        layer_bytes.append(src.layer_bytes(i))
        if echo:
            echo(f"  layer {i + 1}/{cfg.num_layers}: {seconds:.2f} s, {layer_bytes[-1] / GB:.2f} GB read")

    t0 = time.perf_counter()
    h = streamed_hidden(cfg, src, tokens, lengths, tdtype, on_layer)
    # hidden states of the positions that predicted each served token: len(prompt) - 1 + j
    rows = [(b, len(p) - 1 + j) for b, (p, s) in enumerate(zip(prompt_ids, served_ids)) for j in range(len(s))]
    sel = h[[b for b, _ in rows], [t for _, t in rows]] if rows else h.new_zeros(0, cfg.emb_size)
    del h
    logits = streamed_logits(cfg, src, sel, tdtype).numpy()  # (N, V) f32
    records, at = [], 0
    for p, s in zip(prompt_ids, served_ids):
        lg = logits[at:at + len(s)]
        at += len(s)
        records.append(position_record(p, s, lg, top_k))
    stats = {"seconds": round(time.perf_counter() - t0, 2), "layer_seconds": [round(x, 3) for x in layer_seconds],
             "layer_bytes": layer_bytes, "bytes_read": src.bytes_read, "tokens": int(lengths.sum()),
             "peak_rss_bytes": peak_rss_bytes(), "dtype": dtype, "config": cfg.name}
    return {"prompts": records, "stats": stats}


def position_record(prompt: list[int], served: list[int], logits: np.ndarray, top_k: int) -> dict:
    """The reference's numbers at each served position, from its logits (N, V) there."""
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
    top_vals = np.take_along_axis(logits, top, -1)
    served_arr = np.asarray(served, np.int64)
    served_logit = logits[np.arange(len(served)), served_arr] if len(served) else np.zeros(0, np.float32)
    rank = (logits > served_logit[:, None]).sum(-1)  # how many tokens the reference prefers
    return {"prompt_ids": list(prompt), "served_ids": list(served), "output_ids": top[:, 0].tolist(),
            "top_ids": top.tolist(), "top_logits": top_vals.round(6).tolist(),
            "margin": (top_vals[:, 0] - top_vals[:, 1]).tolist() if top_k > 1 else [],
            "served_logit": served_logit.tolist(), "served_rank": rank.tolist(), "logits": logits}


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- estimates for `plan` and verify.mode: auto (pure; no torch) --------------------------------

# Measured by bench/verify_fullsize.py (Grok-1 width, 2 layers, official format, float32, 8 prompts
# x 32 served tokens, 496 tokens a layer) on this project's 2-core host (host.REFERENCE: cores of
# 90 GFLOP/s on host.COMPUTE_PROBE), quiet, the page cache emptied first (at full size 318 GB cannot
# stay cached): 33.7 s and 30.5 s for the two layers, 4.92 GB read per layer from a disk read at
# 1.58 GB/s (host.measure_disk on the checkpoint), so 29.0 s of compute a layer; 12 s for the
# embedding and unembedding (2026-12-08; an earlier run, disk at 2.87 GB/s: 28.6 s a layer). The
# estimate is time = stored bytes / READ_BPS + flops / FLOPS on that host with its disk at
# host.REF_DISK_BPS, carried over to this one by host.Host.scale (the disk part at this disk's rate,
# the rest over the usable cores and their speed); the compute split between dequantising and
# matmuls is an earlier host's (12.7 s and 39.0 s a layer there). A loaded host is slower (the
# same bench under a load average of ~11 took 353 s a layer).
READ_BPS = 0.348e9     # stored (int8) bytes per second read from disk and dequantised (block by block)
FLOPS = 58.8e9         # sustained f32 matmul flop/s of a streamed layer (2 cores)
MEM_BPS = 10e9         # weights streamed from RAM per decode step (golden mode)
# (all three on host.REFERENCE; Host.scale carries them over)


def reference_ram_bytes(m, dtype: str) -> int:
    """Memory of today's in-RAM reference (golden): every weight in the compute dtype."""
    return m.param_count() * DTYPE_BYTES[dtype]


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def resolve_mode(mode: str, m, dtype: str, host_bytes: int | None = None) -> tuple[str, str]:
    """(golden | score, why) for verify.mode; `auto` scores when the in-RAM reference (plus a
    quarter for activations and the KV cache) would not fit the host's memory."""
    if mode != "auto":
        return mode, f"verify.mode: {mode}"
    host = host_memory_bytes() if host_bytes is None else host_bytes
    need = int(reference_ram_bytes(m, dtype) * 1.25)
    if need <= host:
        return "golden", f"auto: the in-RAM reference needs ~{need / GB:.1f} GB <= host {host / GB:.1f} GB"
    return "score", f"auto: the in-RAM reference needs ~{need / GB:.1f} GB > host {host / GB:.1f} GB"


def prompt_tokens_guess(prompts: list[str]) -> list[int]:
    """Token counts of prompts without a tokenizer (plan stays light): ~4 UTF-8 bytes a token."""
    return [max(1, round(len(p.encode()) / 4)) for p in prompts]


def golden_estimate(m, dtype: str, prompt_tokens: list[int], max_tokens: int, batch: int = 4,
                    host: Host | None = None) -> dict:
    """Peak memory and time of the in-RAM reference (load every weight, then decode on the KV cache)
    on `host` (default: this one's cores, the reference disk)."""
    host = host or current()
    a = DTYPE_BYTES[dtype]
    stored = m.param_count()  # ~1 byte a weight stored (int8), read and dequantised once
    steps = -(-len(prompt_tokens) // batch) * max_tokens  # batched decode steps
    flops = 2 * m.active_param_count() * (sum(prompt_tokens) + len(prompt_tokens) * max_tokens)
    seconds = (host.scale(stored / READ_BPS, stored) + host.scale(steps * m.param_count() * a / MEM_BPS)
               + host.scale(flops / FLOPS))
    return {"peak_bytes": int(reference_ram_bytes(m, dtype) * 1.25), "seconds": seconds}


def score_estimate(m, dtype: str, prompt_tokens: list[int], max_tokens: int, host: Host | None = None) -> dict:
    """Peak memory and time of a streamed scoring pass of these prompts (token counts) on `host`
    (default: this one's cores, the reference disk)."""
    host = host or current()
    d, f, e, k, v = m.emb_size, m.ffn_size, m.num_experts, m.num_selected_experts, m.vocab_size
    a = DTYPE_BYTES[dtype]
    n = sum(prompt_tokens) + len(prompt_tokens) * max_tokens  # tokens through every layer
    b, t = len(prompt_tokens), max(prompt_tokens) + max_tokens
    # one expert's int8 pages mapped while its matrices are multiplied a block of rows at a time
    # (model.quantized; bf16 assembles one matrix in bf16); measured 1.7 GB in all at Grok-1 width
    expert = 3 * d * f + (d * f * a if a != 4 else 0) + 8 * 2 ** 20
    attn = (2 * m.q_size * d + 2 * m.kv_size * d) * a   # the layer's attention matrices
    acts = b * t * d * a * 6 + m.num_q_heads * min(t, 256) * t * 4  # residual, branches, one score block
    logits = len(prompt_tokens) * max_tokens * v * 4 + 8192 * d * 4
    peak = expert + attn + acts + logits + 400e6        # + the interpreter, torch and numpy
    stored = e * 3 * d * f * 1 + (2 * m.q_size * d + 2 * m.kv_size * d) + e * d * 4  # int8 + router
    flops = 2 * n * (k * 3 * d * f + 2 * m.q_size * d + 2 * m.kv_size * d) + 4 * b * t * t * m.q_size
    layer_s = host.scale(stored / READ_BPS, stored) + host.scale(flops / FLOPS)
    unembed_s = (host.scale(v * d * 4 / READ_BPS, v * d * 4)
                 + host.scale(2 * len(prompt_tokens) * max_tokens * v * d / FLOPS))
    return {"peak_bytes": int(peak), "seconds_per_layer": layer_s, "bytes_per_layer": int(stored),
            "seconds": m.num_layers * layer_s + unembed_s, "tokens": n}
