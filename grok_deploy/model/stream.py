"""The reference forward pass, layer by layer, over weights fetched through a `WeightSource`.

No files here (the model room does no I/O): a source (checkpoint.stream.CheckpointSource, or the
effective weights of TensorRT-LLM rank files) hands over one layer's dense weights at a time and,
inside a layer, one expert at a time, so peak memory is about one expert's matrices in the
compute dtype plus the activations of all sequences, whatever the number of layers.

The math is `grok.decoder_layer`, the same function `Grok.forward` runs, so a streamed pass
equals the in-RAM model up to float rounding of differently blocked matmuls.

A causal pass over whole sequences needs no KV cache: teacher-forced scoring runs prompt + served
tokens of every sequence at once and reads the logits of the positions it scores.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from grok_deploy.model.config import GrokConfig
from grok_deploy.model.grok import decoder_layer, multipliers, rms_norm, rope_tables

VOCAB_BLOCK = 8192   # embedding rows per block of the unembedding (6144 x 8192 f32 = 200 MB)
ATTN_ROWS = 256      # queries per attention block (scores 48 x 256 x S f32)


class WeightSource(Protocol):
    """What the streamed forward asks for; every tensor is float32 unless said otherwise."""

    def embedding_rows(self, ids: Tensor) -> Tensor: ...             # (N,) -> (N, D)
    def embedding_blocks(self, rows: int) -> Iterator[tuple[int, Tensor]]: ...  # (lo, (n, D))
    def final_norm(self) -> Tensor: ...                               # (D,)
    def layer(self, i: int, dtype: torch.dtype): ...                  # decoder_layer's `lw`


def causal_mask(lengths: Tensor, t: int) -> Tensor:
    """(B, T, T) bool: query q sees key s <= q, and only real tokens (s < length)."""
    pos = torch.arange(t)
    return (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lengths[:, None, None])


@torch.no_grad()
def streamed_hidden(cfg: GrokConfig, source: WeightSource, tokens: Tensor, lengths: Tensor,
                    dtype: torch.dtype = torch.float32,
                    on_layer: Callable[[int, Tensor, float], None] | None = None,
                    taps: list | None = None) -> Tensor:
    """Final hidden states (B, T, D) in `dtype` of right-padded `tokens` (B, T) at positions 0..

    `on_layer(i, h, seconds)` is called after each layer with its output (for progress and
    timing); `taps`, if given, gets per layer {"input", "attention", "moe"} (B, T, D) for a
    layer-by-layer comparison."""
    b, t = tokens.shape
    emb_mult, _ = multipliers(cfg, dtype)
    positions = torch.arange(t).expand(b, t)
    cos, sin = rope_tables(positions, cfg.key_size, cfg.rope_base)
    mask = causal_mask(lengths, t)
    h = source.embedding_rows(tokens.reshape(-1)).to(dtype).view(b, t, cfg.emb_size) * emb_mult
    for i in range(cfg.num_layers):
        t0 = time.perf_counter()
        lw = source.layer(i, dtype)
        tap = None if taps is None else {"input": h}
        h = decoder_layer(cfg, h, lw, cos, sin, mask, attn_rows=ATTN_ROWS, taps=tap)
        if taps is not None:
            taps.append(tap)
        del lw
        if on_layer:
            on_layer(i, h, time.perf_counter() - t0)
    return h


@torch.no_grad()
def streamed_logits(cfg: GrokConfig, source: WeightSource, h: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """f32 logits (N, V) of hidden states h (N, D), the embedding read a block of rows at a time."""
    _, out_mult = multipliers(cfg, dtype)
    hn = rms_norm(h.to(dtype), source.final_norm(), cfg.norm_eps)
    out = torch.empty(h.shape[0], cfg.vocab_size)
    for lo, block in source.embedding_blocks(VOCAB_BLOCK):
        out[:, lo:lo + block.shape[0]] = ((hn @ block.to(dtype).T) * out_mult).float()
    return out
