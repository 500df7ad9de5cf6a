"""make-tiny: a random model of a preset, written in the official checkpoint format.

Weights are drawn per leaf from a seed (same seed, identical bytes) and scaled so activations
stay in a sane range and routing is not degenerate; the matmul weights are quantised like the
release (int8 with bf16 per-column scales, 8 K-block scales for the row-parallel matrices).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from grok_deploy.errors import UserError
from grok_deploy.manifest import check_replaceable, clean_stale, commit, is_empty, new_tmp
from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig


# Scale of each leaf's random values, as a function of the config (std of a normal draw).
def _leaf_std(cfg: GrokConfig, leaf: str) -> float:
    d, f = cfg.emb_size, cfg.ffn_size
    return {
        "multi_head_attention/query/w": 2.0 / d ** 0.5,
        "multi_head_attention/key/w": 2.0 / d ** 0.5,
        "multi_head_attention/value/w": 1.0 / d ** 0.5,
        "multi_head_attention/linear/w": 1.0 / cfg.q_size ** 0.5,
        "moe/linear/w": 1.0 / d ** 0.5,
        "moe/linear_v/w": 1.0 / d ** 0.5,
        "moe/linear_1/w": 1.0 / f ** 0.5,
        "router/w": 1.5 / d ** 0.5,  # router logits of std ~1.5: every expert gets tokens
    }[leaf]


def random_leaf(cfg: GrokConfig, path: str, index: int, seed: int):
    """The float32 array, or the QuantizedWeight8bit, of one leaf; depends only on (seed, index)."""
    from grok_deploy.checkpoint.xai import quantize_blocks

    rng = np.random.default_rng([seed, index])
    shape = names.leaf_shape(cfg, path)
    if path == names.EMBEDDING:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if path == names.FINAL_NORM:
        # Zero-mean, signed: with a tied embedding and a residual stream led by the input
        # embedding, a positive final norm makes every greedy step repeat the last token. Signed
        # weights turn that into a varied map, while the model stays insensitive to int8 noise
        # (a branch-dominated stream would also vary, but is chaotic under quantisation).
        return (6.0 * rng.standard_normal(shape)).astype(np.float32)
    _, leaf = names.split_layer_path(path)
    if leaf.startswith("rms_norm"):
        base = 0.5 if leaf in ("rms_norm_1/scale", "rms_norm_3/scale") else 1.0
        return (base * (1.0 + 0.1 * rng.standard_normal(shape))).astype(np.float32)
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(_leaf_std(cfg, leaf))
    if leaf not in names.QUANTIZED_LEAVES:
        return w
    if leaf in names.ROW_PARALLEL_LEAVES:
        # K-blocks of different magnitude, so the 8 block scales differ as in the release
        k = shape[-2]
        block = np.exp(0.3 * rng.standard_normal(shape[:-2] + (names.SCALE_K_BLOCKS, 1, 1))).astype(np.float32)
        w = (w.reshape(shape[:-2] + (names.SCALE_K_BLOCKS, k // names.SCALE_K_BLOCKS, shape[-1])) * block).reshape(shape)
        return quantize_blocks(w, names.SCALE_K_BLOCKS)
    return quantize_blocks(w, 1)


def make_tiny(out, preset: str | GrokConfig = "grok-1-tiny", seed: int = 0, progress: bool = True) -> Path:
    """Write OUT/ckpt-0/tensor{i:05d}_000 and OUT/tokenizer.model; atomic (tmp dir, then rename).
    `preset` is a preset name or a GrokConfig (e.g. a preset with fewer layers). OUT must be new,
    new or empty."""
    cfg = preset if isinstance(preset, GrokConfig) else GrokConfig.from_name(preset)
    out = Path(out)
    _check_preset(cfg)
    if "\0" in str(out):
        raise UserError(f"{str(out)!r}: the output path contains a NUL character")
    check_replaceable(out, "source")  # not inside another output; never a user's folder
    if not is_empty(out):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new folder or remove it")
    clean_stale(out)
    tmp = new_tmp(out, "source")
    try:
        write_tiny(tmp, cfg, seed, progress)
        commit(tmp, out, kind="source")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_preset(cfg: GrokConfig) -> None:
    if cfg.ffn_size % names.SCALE_K_BLOCKS or cfg.q_size % names.SCALE_K_BLOCKS:
        raise UserError(f"preset {cfg.name}: K axes must split into {names.SCALE_K_BLOCKS} scale blocks")


def write_tiny(folder: Path, preset: str | GrokConfig, seed: int = 0, progress: bool = True) -> None:
    """The files of make_tiny, into the existing (tmp) folder `folder` (the pipeline's source stage)."""
    from grok_deploy.checkpoint.xai import write_checkpoint
    from grok_deploy.model.tokenizer import train_tiny_tokenizer

    cfg = preset if isinstance(preset, GrokConfig) else GrokConfig.from_name(preset)
    _check_preset(cfg)
    (folder / "tokenizer.model").write_bytes(train_tiny_tokenizer(cfg.vocab_size, seed))
    leaves = ((p, random_leaf(cfg, p, i, seed)) for i, p in enumerate(names.flatten_order(cfg.num_layers)))
    write_checkpoint(folder, cfg, leaves, progress=progress)


def cli_make_tiny(args) -> int:
    out = make_tiny(args.out, args.preset, args.seed)
    print(f"wrote {out} ({args.preset}, seed {args.seed})")
    return 0
