"""Parameter names of the official (xAI Haiku) checkpoint, written as data.

The canonical in-memory weight layout of this project is the official one: a dict keyed by the
Haiku paths below, matrices [in, out], experts stacked on axis 0 ([E, D, F] / [E, F, D]), the
router [D, E], the embedding [V, D].
"""
from __future__ import annotations

EMBEDDING = "language_model/in_out_embed/embeddings"
FINAL_NORM = "language_model/rms_norm/scale"
LAYER_PREFIX = "transformer/decoder_layer_{layer}/"

# Per-layer leaves (relative to LAYER_PREFIX), already in string-sorted order.
LAYER_LEAVES = (
    "moe/linear/w",                      # [E, D, F] gate branch (gets GELU), QW8, scales [E, 1, F]
    "moe/linear_1/w",                    # [E, F, D] down, QW8, scales [E, 8, D]
    "moe/linear_v/w",                    # [E, D, F] up/value branch, QW8, scales [E, 1, F]
    "multi_head_attention/key/w",        # [D, Hkv*dk], QW8, scales [1, Hkv*dk]
    "multi_head_attention/linear/w",     # [Hq*dk, D] out proj, QW8, scales [8, D]
    "multi_head_attention/query/w",      # [D, Hq*dk], QW8, scales [1, Hq*dk]
    "multi_head_attention/value/w",      # [D, Hkv*dk], QW8, scales [1, Hkv*dk]
    "rms_norm/scale",                    # [D] pre-attention
    "rms_norm_1/scale",                  # [D] post-attention (on the branch output)
    "rms_norm_2/scale",                  # [D] pre-MoE
    "rms_norm_3/scale",                  # [D] post-MoE (on the branch output)
    "router/w",                          # [D, E] f32
)
QUANTIZED_LEAVES = frozenset(LAYER_LEAVES[:7])
# Leaves whose K (input) axis carries 8 block scales in the release.
ROW_PARALLEL_LEAVES = frozenset({"moe/linear_1/w", "multi_head_attention/linear/w"})
SCALE_K_BLOCKS = 8


def layer_path(layer: int, leaf: str) -> str:
    return LAYER_PREFIX.format(layer=layer) + leaf


def split_layer_path(path: str) -> tuple[int, str] | None:
    """`transformer/decoder_layer_3/router/w` -> (3, "router/w"); None for global leaves."""
    if not path.startswith("transformer/decoder_layer_"):
        return None
    rest = path[len("transformer/decoder_layer_"):]
    num, leaf = rest.split("/", 1)
    return int(num), leaf


def flatten_order(num_layers: int) -> list[str]:
    """All leaf paths in JAX's flatten order: dict keys sorted as strings at every level.

    File `ckpt-0/tensor{i:05d}_000` holds leaf i of this list. Layer 10 sorts before layer 2.
    """
    paths = [EMBEDDING, FINAL_NORM]
    paths += [layer_path(n, leaf) for n in range(num_layers) for leaf in LAYER_LEAVES]
    return sorted(paths)


def leaf_shape(cfg, path: str) -> tuple[int, ...]:
    """Logical shape of a leaf for a GrokConfig (Haiku [in, out] layout)."""
    d, e, f = cfg.emb_size, cfg.num_experts, cfg.ffn_size
    if path == EMBEDDING:
        return (cfg.vocab_size, d)
    if path == FINAL_NORM:
        return (d,)
    _, leaf = split_layer_path(path)
    return {
        "moe/linear/w": (e, d, f),
        "moe/linear_1/w": (e, f, d),
        "moe/linear_v/w": (e, d, f),
        "multi_head_attention/key/w": (d, cfg.kv_size),
        "multi_head_attention/linear/w": (cfg.q_size, d),
        "multi_head_attention/query/w": (d, cfg.q_size),
        "multi_head_attention/value/w": (d, cfg.kv_size),
        "router/w": (d, e),
    }.get(leaf, (d,))


def scale_shape(cfg, path: str) -> tuple[int, ...] | None:
    """Shape of the bf16 scales of a quantised leaf, as in the release; None for float leaves."""
    split = split_layer_path(path)
    if split is None or split[1] not in QUANTIZED_LEAVES:
        return None
    leaf = split[1]
    shape = leaf_shape(cfg, path)
    if leaf in ROW_PARALLEL_LEAVES:
        return shape[:-2] + (SCALE_K_BLOCKS, shape[-1])
    return shape[:-2] + (1, shape[-1])
