"""`inspect`: list a checkpoint's tensors without loading them, and name the non-finite ones."""
from __future__ import annotations

import json

import numpy as np

from grok_deploy.errors import UserError
from grok_deploy.model import names

CHUNK = 1 << 24  # elements per finiteness check: 64 MiB of float32 at a time


def describe(ckpt) -> dict:
    """The interface.md JSON: format, config, and one row per tensor (no payload read)."""
    return {
        "format": ckpt.format,
        "config": ckpt.config.to_dict(),
        "tensors": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype,
                     "quantized": i.quantized, "file": i.file} for i in ckpt.infos()],
    }


def _float_parts(ckpt, name: str):
    """The stored float arrays of a leaf, one at a time: int8 codes are always finite, so only
    the scales of a quantised leaf; Hugging Face experts one by one."""
    raw = ckpt.read_raw(name) if ckpt.format == "xai" else None
    if raw is not None:
        yield raw.scales if hasattr(raw, "scales") else raw
        return
    if len(names.leaf_shape(ckpt.config, name)) == 3:
        for e in range(ckpt.config.num_experts):
            yield ckpt.read_expert(name, e)
    else:
        yield ckpt.read(name)


def count_non_finite(arr) -> int:
    """NaN and inf values in a float array (int8 codes: 0), counted CHUNK elements at a time."""
    flat = np.asarray(arr).reshape(-1)
    if flat.dtype.kind not in "fc" and flat.dtype.name != "bfloat16":
        return 0
    count = 0
    for a in range(0, flat.size, CHUNK):
        part = flat[a:a + CHUNK]
        count += int(part.size - np.count_nonzero(np.isfinite(part)))
    return count


def non_finite(ckpt) -> dict[str, int]:
    """{leaf name: number of NaN or inf values} of every leaf that has any, streamed in chunks."""
    bad: dict[str, int] = {}
    for name in ckpt.names():
        count = sum(count_non_finite(arr) for arr in _float_parts(ckpt, name))
        if count:
            bad[name] = count
    return bad


def check_finite(where, name: str, arr) -> None:
    """UserError (inspect's message) when the weights `arr` of leaf `name` hold NaN or inf: every
    command that loads weights refuses them (one NaN makes every logit NaN)."""
    count = count_non_finite(arr)
    if count:
        raise UserError(non_finite_message(where, {name: count}))


def non_finite_message(where, bad: dict[str, int]) -> str:
    shown = ", ".join(f"{n} ({c} values)" for n, c in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"{where}: {len(bad)} tensors hold NaN or inf values: {shown}{more}; the checkpoint is corrupt, "
            "download those files again")


def cli_inspect(args) -> int:
    from grok_deploy.checkpoint import open_checkpoint

    ckpt = open_checkpoint(args.ckpt, preset=args.preset)
    doc = describe(ckpt)
    bad = non_finite(ckpt)
    doc["non_finite"] = [{"name": n, "count": c} for n, c in bad.items()]
    if args.json:
        print(json.dumps(doc))
    else:
        cfg = doc["config"]
        print(f"format {doc['format']}  preset {cfg['name']}  layers {cfg['num_layers']}  "
              f"emb {cfg['emb_size']}  vocab {cfg['vocab_size']}  tensors {len(doc['tensors'])}")
        for t in doc["tensors"]:
            q = "int8+scales" if t["quantized"] else t["dtype"]
            flag = f"  NON-FINITE: {bad[t['name']]} values" if t["name"] in bad else ""
            print(f"  {t['file']:<22} {t['name']:<58} {str(tuple(t['shape'])):<22} {q}{flag}")
    if bad:
        raise UserError(non_finite_message(args.ckpt, bad))
    return 0
