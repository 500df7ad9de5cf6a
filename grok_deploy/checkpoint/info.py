"""`inspect`: list a checkpoint's tensors without loading them, and name the non-finite ones."""
from __future__ import annotations

import json

from grok_deploy.checkpoint.base import count_non_finite, non_finite_message
from grok_deploy.errors import UserError
from grok_deploy.model import names


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


def non_finite(ckpt) -> dict[str, int]:
    """{leaf name: number of NaN or inf values} of every leaf that has any, streamed in chunks."""
    bad: dict[str, int] = {}
    for name in ckpt.names():
        count = sum(count_non_finite(arr) for arr in _float_parts(ckpt, name))
        if count:
            bad[name] = count
    return bad


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
