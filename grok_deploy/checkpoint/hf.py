"""The hpcai-tech Hugging Face port (`Grok1ModelForCausalLM`, *.safetensors), mapped back to the
canonical layout: matrices transposed to [in, out], per-expert tensors stacked on axis 0
(xai-checkpoint-format.md §8). Tensors are read lazily, one safetensors entry at a time.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from grok_deploy.checkpoint.base import Checkpoint, TensorInfo, match_config
from grok_deploy.checkpoint.pickle_io import BF16
from grok_deploy.errors import UserError
from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig

# canonical path -> hpcai-tech name; per-layer names sit under `model.layers.{layer}.`
HF_GLOBAL = {
    names.EMBEDDING: "model.embed_tokens.weight",   # [V, D], not transposed; lm_head is tied to it
    names.FINAL_NORM: "model.norm.scale",
}
HF_LAYER = {
    "moe/linear/w": "moe_block.experts.{e}.linear.weight",       # [F, D] per expert
    "moe/linear_1/w": "moe_block.experts.{e}.linear_1.weight",   # [D, F] per expert
    "moe/linear_v/w": "moe_block.experts.{e}.linear_v.weight",   # [F, D] per expert
    "multi_head_attention/key/w": "attn.k_proj.weight",
    "multi_head_attention/linear/w": "attn.o_proj.weight",
    "multi_head_attention/query/w": "attn.q_proj.weight",
    "multi_head_attention/value/w": "attn.v_proj.weight",
    "rms_norm/scale": "pre_attn_norm.scale",
    "rms_norm_1/scale": "post_attn_norm.scale",
    "rms_norm_2/scale": "pre_moe_norm.scale",
    "rms_norm_3/scale": "post_moe_norm.scale",
    "router/w": "moe_block.gate.weight",                         # [E, D]
}
HF_LAYER_PREFIX = "model.layers.{layer}."
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}


def hf_names(cfg_experts: int, path: str) -> list[str]:
    """The hpcai-tech tensor names holding one canonical leaf (one per expert for stacked leaves)."""
    if path in HF_GLOBAL:
        return [HF_GLOBAL[path]]
    layer, leaf = names.split_layer_path(path)
    pattern = HF_LAYER_PREFIX.format(layer=layer) + HF_LAYER[leaf]
    if "{e}" in pattern:
        return [pattern.format(e=e) for e in range(cfg_experts)]
    return [pattern]


def _transposed(path: str, ndim: int) -> bool:
    """torch Linear weights are [out, in]; everything 2-D but the embedding is stored transposed."""
    return ndim == 2 and path != names.EMBEDDING


class HfCheckpoint(Checkpoint):
    format = "hf"

    def __init__(self, path: Path, config: GrokConfig, tokenizer_path: Path, where: dict[str, Path],
                 headers: dict[str, tuple[tuple[int, ...], str]]):
        self.path, self.config, self.tokenizer_path = path, config, tokenizer_path
        self._where, self._headers = where, headers  # hf name -> file; hf name -> (shape, dtype)
        self._leaves = set(self.names())

    def _names(self, name: str) -> list[str]:
        if name not in self._leaves:
            raise KeyError(f"{name!r} is not a leaf of {self.config.name}")
        return hf_names(self.config.num_experts, name)

    def _get(self, path: str, hf_name: str) -> np.ndarray:
        """One stored tensor in the canonical orientation, in its stored dtype."""
        from safetensors import safe_open

        with safe_open(str(self._where[hf_name]), framework="np") as f:
            t = f.get_tensor(hf_name)
        return np.ascontiguousarray(t.T) if _transposed(path, t.ndim) else t

    def infos(self) -> list[TensorInfo]:
        out = []
        for name in self.names():
            hf = self._names(name)
            files = sorted({self._where[n].name for n in hf})
            out.append(TensorInfo(name, names.leaf_shape(self.config, name), self._headers[hf[0]][1],
                                  False, ",".join(files)))
        return out

    def read_raw(self, name: str) -> np.ndarray:
        """The canonical-layout array in its stored dtype (experts stacked)."""
        hf = self._names(name)
        if len(hf) == 1:
            return self._get(name, hf[0])
        first = self._get(name, hf[0])
        out = np.empty((len(hf),) + first.shape, first.dtype)
        out[0] = first
        for e, n in enumerate(hf[1:], 1):
            out[e] = self._get(name, n)
        return out

    def read(self, name: str) -> np.ndarray:
        hf = self._names(name)
        if len(hf) == 1:
            return self._get(name, hf[0]).astype(np.float32)
        out = np.empty(names.leaf_shape(self.config, name), np.float32)
        for e, n in enumerate(hf):
            out[e] = self._get(name, n)
        return out

    def read_expert(self, name: str, e: int) -> np.ndarray:
        self._expert_check(name, e)
        return self._get(name, self._names(name)[e]).astype(np.float32)

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        hf = self._names(name)
        if len(hf) != 1 or _transposed(name, 2):
            return super().read_rows(name, lo, hi)
        from safetensors import safe_open

        with safe_open(str(self._where[hf[0]]), framework="np") as f:
            return np.asarray(f.get_slice(hf[0])[lo:hi], np.float32)


MAX_HEADER_BYTES = 8 << 20  # a shard of the port lists a few hundred tensors (~100 KB of header)
MAX_TENSORS = 20_000
MAX_METADATA = 1024  # __metadata__ entries: a port's shards carry one ({"format": "pt"})


def check_header(file: Path) -> None:
    """Refuse, before safetensors parses it, anything but a regular file whose JSON header is at
    most MAX_HEADER_BYTES, lists at most MAX_TENSORS tensors and MAX_METADATA metadata entries
    (safetensors parses the whole header at every open: a header padded with junk tensors or 300k
    metadata entries made every lookup slow, 25-31 s for `inspect`)."""
    try:
        with open(file, "rb", opener=lambda p, fl: os.open(p, fl | os.O_NONBLOCK)) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{file}: is {'a folder' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}, "
                                "not a safetensors file; put the downloaded shard there")
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, st.st_size - 8):
                size = ("truncated" if n < 0 or n > st.st_size - 8
                        else f"a header of {n} bytes (at most {MAX_HEADER_BYTES})")
                raise UserError(f"{file}: not a Grok-1 safetensors shard ({size}); download it again")
            blob = f.read(n)
    except IsADirectoryError:
        raise UserError(f"{file}: is a folder, not a safetensors file; put the downloaded shard there") from None
    except OSError as e:
        why = "a symlink loop" if e.errno == errno.ELOOP else e.strerror
        raise UserError(f"{file}: cannot be read ({why}); put the downloaded shard there") from None
    try:
        header = json.loads(blob)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{file}: not a readable safetensors file (its header is not JSON: {e}); "
                        "download it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{file}: not a readable safetensors file (its header is not a JSON object); download it again")
    meta = header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise UserError(f"{file}: {len(header)} tensors in one shard (the whole model has a few "
                        "thousand); not a Grok-1 shard")
    if isinstance(meta, dict) and len(meta) > MAX_METADATA:
        raise UserError(f"{file}: {len(meta)} metadata entries in its header (a shard of the port has 1, at most "
                        f"{MAX_METADATA} are allowed); not a Grok-1 shard, download it again")


def open_hf(path: Path, tokenizer: Path, preset: str | GrokConfig | None) -> HfCheckpoint:
    """Index the *.safetensors of `path` by name, measure the model sizes, check every shape."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in sorted(path.glob("*.safetensors")):
        check_header(file)
        try:
            with safe_open(str(file), framework="np") as f:
                keys = f.keys()  # at most MAX_TENSORS (check_header)
                for key in keys:
                    if key in where:
                        raise UserError(f"{file}: tensor {key!r} is also in {where[key].name}; remove the "
                                        "shard that does not belong")
                    sl = f.get_slice(key)
                    where[key] = file
                    headers[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except UserError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    dtype_names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    layers = 1 + max((int(m.group(1)) for k in where if (m := _LAYER_RE.match(k))), default=-1)

    def shape(key: str) -> tuple[int, ...]:
        if key not in headers:
            raise UserError(f"{path}: no tensor {key!r}; this reader expects the hpcai-tech "
                            "Grok1ModelForCausalLM names (xai-checkpoint-format.md §8)")
        return headers[key][0] or (0,)

    emb = shape(HF_GLOBAL[names.EMBEDDING])
    found = {"vocab_size": emb[0], "emb_size": emb[-1], "num_layers": layers,
             "q_size": shape("model.layers.0.attn.q_proj.weight")[0],
             "kv_size": shape("model.layers.0.attn.k_proj.weight")[0],
             "ffn_size": shape("model.layers.0.moe_block.experts.0.linear.weight")[0]}
    cfg = match_config(path, found, preset)
    for leaf in names.flatten_order(cfg.num_layers):
        keys = hf_names(cfg.num_experts, leaf)
        exp = names.leaf_shape(cfg, leaf)[1 if len(keys) > 1 else 0:]
        exp = exp[::-1] if _transposed(leaf, len(exp)) else exp
        for key in keys:
            got, dt = shape(key), headers[key][1]
            if got != exp or dt not in dtype_names:
                raise UserError(f"{where[key]}: {key} is {dt} {list(got)}, expected F32/BF16/F16 "
                                f"{list(exp)} for {cfg.name}")
    headers = {k: (s, dtype_names.get(d, d)) for k, (s, d) in headers.items()}
    return HfCheckpoint(path, cfg, tokenizer, where, headers)


def write_hf_checkpoint(out_dir, cfg: GrokConfig, params_f32: Mapping[str, np.ndarray],
                        shard_bytes: int = 2 << 30, dtype: str = "bfloat16") -> Path:
    """Write canonical float32 params as an hpcai-tech port (sharded *.safetensors + index).

    For tests and small models: one shard (about `shard_bytes`) is held in memory at a time.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dt = _DTYPES[dtype]
    parts: list[tuple[Path, list[str]]] = []  # (temporary file, its tensor names)
    shard: dict[str, np.ndarray] = {}
    total = 0

    def flush() -> None:
        tmp = out / f".shard-{len(parts) + 1:05d}.tmp-{os.getpid()}"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        parts.append((tmp, list(shard)))
        shard.clear()

    for path in names.flatten_order(cfg.num_layers):
        w = np.asarray(params_f32[path], dtype=np.float32)
        hf = hf_names(cfg.num_experts, path)
        for e, key in enumerate(hf):
            t = w[e] if len(hf) > 1 else w
            t = np.ascontiguousarray(t.T if _transposed(path, t.ndim) else t).astype(dt)
            if shard and sum(x.nbytes for x in shard.values()) + t.nbytes > shard_bytes:
                flush()
            shard[key] = t
            total += t.nbytes
    flush()
    weight_map = {}
    for i, (tmp, keys) in enumerate(parts, 1):
        fname = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        os.replace(tmp, out / fname)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
