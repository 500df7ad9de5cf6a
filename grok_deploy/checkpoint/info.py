"""`inspect`: list a checkpoint's tensors without loading them."""
from __future__ import annotations

import json


def describe(ckpt) -> dict:
    """The interface.md JSON: format, config, and one row per tensor (no payload read)."""
    return {
        "format": ckpt.format,
        "config": ckpt.config.to_dict(),
        "tensors": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype,
                     "quantized": i.quantized, "file": i.file} for i in ckpt.infos()],
    }


def cli_inspect(args) -> int:
    from grok_deploy.checkpoint import open_checkpoint

    doc = describe(open_checkpoint(args.ckpt, preset=args.preset))
    if args.json:
        print(json.dumps(doc))
        return 0
    cfg = doc["config"]
    print(f"format {doc['format']}  preset {cfg['name']}  layers {cfg['num_layers']}  "
          f"emb {cfg['emb_size']}  vocab {cfg['vocab_size']}  tensors {len(doc['tensors'])}")
    for t in doc["tensors"]:
        q = "int8+scales" if t["quantized"] else t["dtype"]
        print(f"  {t['file']:<22} {t['name']:<58} {str(tuple(t['shape'])):<22} {q}")
    return 0
