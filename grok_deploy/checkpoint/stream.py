"""A checkpoint as a `model.stream.WeightSource`: one layer, and inside it one expert, at a time.

Works for every reader (official format: int8 x scales dequantised per expert; Hugging Face
port: one safetensors entry per expert). Counts the bytes it reads from the files
(`bytes_read`), so a caller can report bytes per layer.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from grok_deploy.checkpoint.base import check_finite
from grok_deploy.checkpoint.xai import QuantizedWeight8bit
from grok_deploy.model import names
from grok_deploy.model.grok import LEAF_TO_ATTR
from grok_deploy.model.quantized import QuantizedMatrix, over_array

EXPERT_LEAVES = ("moe/linear/w", "moe/linear_v/w", "moe/linear_1/w")  # w (gate), v (up), o (down)
FLOAT32_ATTRS = {"norm0", "norm1", "norm2", "norm3", "router"}       # kept f32, as the original


class StreamedLayer:
    """One layer's dense weights (attention in the compute dtype, norms and router f32) and
    `expert(e)`, which reads that expert's three matrices only when called."""

    def __init__(self, source: "CheckpointSource", layer: int, dtype: torch.dtype):
        self._src, self._layer, self._dtype = source, layer, dtype
        for leaf, attr in LEAF_TO_ATTR.items():
            if leaf in EXPERT_LEAVES:
                continue
            t = torch.from_numpy(source.read(names.layer_path(layer, leaf)))
            setattr(self, attr, t if attr in FLOAT32_ATTRS else t.to(dtype))

    def expert(self, e: int) -> tuple:
        """(w, v, o) of expert e: (D, F), (D, F), (F, D). The release's int8 matrices stay codes x
        scales over the file's pages (model.quantized: dequantised a block of rows at a time as
        they are multiplied); float sources give tensors in the compute dtype."""
        out = []
        for leaf in EXPERT_LEAVES:
            name = names.layer_path(self._layer, leaf)
            raw = self._src.read_expert_codes(name, e)
            if raw is not None:
                out.append(QuantizedMatrix(*raw, dtype=self._dtype))
                continue
            a = self._src.read_expert(name, e)
            out.append(torch.from_numpy(a).to(self._dtype))  # f32 -> dtype, then the f32 copy is freed
            del a
        return tuple(out)


class CheckpointSource:
    """WeightSource over an opened Checkpoint (checkpoint.open_checkpoint)."""

    def __init__(self, ckpt):
        self.ckpt, self.config = ckpt, ckpt.config
        self.bytes_read = 0
        self._stored = {i.name: _stored_bytes(i) for i in ckpt.infos()}
        self._finite: set = set()  # what was checked for NaN/inf already (each part once, not every step)

    def _checked(self, key, name: str, arr) -> np.ndarray:
        if key not in self._finite:
            check_finite(self.ckpt.path, name, arr)
            self._finite.add(key)
        return arr

    # reading, with the stored bytes counted and NaN/inf refused
    def read(self, name: str) -> np.ndarray:
        self.bytes_read += self._stored[name]
        return self._checked(name, name, self.ckpt.read(name))

    def read_expert(self, name: str, e: int) -> np.ndarray:
        self.bytes_read += self._stored[name] // self.config.num_experts
        return self._checked((name, e), name, self.ckpt.read_expert(name, e))

    def read_expert_codes(self, name: str, e: int) -> tuple[Tensor, Tensor] | None:
        """(int8 codes over a memory map, float32 scales) of expert e of a quantised leaf of the
        official format; None for other leaves and formats."""
        if self.ckpt.format != "xai":
            return None
        raw = self.ckpt.read_raw(name)
        if not isinstance(raw, QuantizedWeight8bit):
            return None
        self.bytes_read += self._stored[name] // self.config.num_experts
        scales = self._checked((name, e), name, np.asarray(raw.scales[e], np.float32))  # int8 codes are finite
        return over_array(raw.weight[e]), torch.from_numpy(scales)

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        self.bytes_read += self._stored[name] * (hi - lo) // self.config.vocab_size
        return self._checked((name, lo, hi), name, self.ckpt.read_rows(name, lo, hi))

    # the WeightSource protocol
    def embedding_rows(self, ids: Tensor) -> Tensor:
        """Rows of the embedding for ids (N,), read in vocabulary blocks that hold any of them."""
        from grok_deploy.model.stream import VOCAB_BLOCK

        ids = ids.long()
        out = torch.empty(ids.shape[0], self.config.emb_size)
        for lo in torch.unique(ids // VOCAB_BLOCK).tolist():
            lo *= VOCAB_BLOCK
            block = self.read_rows(names.EMBEDDING, lo, min(lo + VOCAB_BLOCK, self.config.vocab_size))
            hit = (ids >= lo) & (ids < lo + VOCAB_BLOCK)
            out[hit] = torch.from_numpy(block)[ids[hit] - lo]
        return out

    def embedding_blocks(self, rows: int) -> Iterator[tuple[int, Tensor]]:
        for lo in range(0, self.config.vocab_size, rows):
            yield lo, torch.from_numpy(self.read_rows(names.EMBEDDING, lo, min(lo + rows, self.config.vocab_size)))

    def final_norm(self) -> Tensor:
        return torch.from_numpy(self.read(names.FINAL_NORM))

    def layer(self, i: int, dtype: torch.dtype) -> StreamedLayer:
        return StreamedLayer(self, i, dtype)

    def layer_bytes(self, i: int) -> int:
        """Stored bytes of layer i's tensors (what one layer of a streamed pass reads)."""
        return sum(b for n, b in self._stored.items() if n.startswith(names.LAYER_PREFIX.format(layer=i)))


def _stored_bytes(info) -> int:
    """Bytes of a leaf in its file(s): the array plus its bf16 scales, if quantised."""
    item = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}.get(info.dtype, 4)
    n = int(np.prod(info.shape, dtype=np.int64)) * item
    if info.scale_shape:
        n += int(np.prod(info.scale_shape, dtype=np.int64)) * 2
    return n
