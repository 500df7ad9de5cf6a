"""TensorRT-LLM tensor names of Grok-1 (`Grok1ModelForCausalLM`), written as data.

See trtllm-checkpoint.md §3. Per-layer names carry the prefix `transformer.layers.{l}.` with the
*local* layer index inside the pipeline stage. Right-hand sides are the official leaves
(names.LAYER_LEAVES) each tensor is made from.
"""
from __future__ import annotations

ARCHITECTURE = "Grok1ModelForCausalLM"
LAYER_PREFIX = "transformer.layers.{layer}."

# global tensors
VOCAB_EMBEDDING = "transformer.vocab_embedding.weight"  # [V, D], first pipeline stage
LN_F = "transformer.ln_f.weight"                         # [D], last stage
LM_HEAD = "lm_head.weight"                               # [V/T, D] [out, in], last stage, never quantised

# per-layer norms (dtype, replicated) -> official leaf
NORMS = {
    "input_layernorm.weight": "rms_norm/scale",
    "post_attn_layernorm.weight": "rms_norm_1/scale",   # on the attention output
    "post_layernorm.weight": "rms_norm_2/scale",        # the *pre*-MoE norm, despite the name
    "post_mlp_layernorm.weight": "rms_norm_3/scale",    # on the MoE output
}
ROUTER = "mlp.router.weight"  # [E, D] float32, replicated, from router/w [D, E] transposed
ROUTER_LEAF = "router/w"

# matrices -> the official leaves fused into them, in output-axis order
QKV = "attention.qkv"      # [Q_r | K_r | V_r], column-parallel
DENSE = "attention.dense"  # row-parallel
FC = "mlp.fc"              # [linear_v_r | linear_r] per expert, column-parallel
PROJ = "mlp.proj"          # row-parallel per expert
MATRICES = {
    QKV: ("multi_head_attention/query/w", "multi_head_attention/key/w", "multi_head_attention/value/w"),
    DENSE: ("multi_head_attention/linear/w",),
    FC: ("moe/linear_v/w", "moe/linear/w"),
    PROJ: ("moe/linear_1/w",),
}
ROW_PARALLEL = frozenset({DENSE, PROJ})
EXPERT_MATRICES = frozenset({FC, PROJ})
WEIGHT = ".weight"
SCALE = ".per_channel_scale"  # W8A16 only: one scale per output column, in the activation dtype

# order of the tensors of one layer in a rank file
LAYER_ORDER = (
    "input_layernorm.weight", QKV, DENSE, "post_attn_layernorm.weight",
    "post_layernorm.weight", ROUTER, FC, PROJ, "post_mlp_layernorm.weight",
)

# config.json `quantization` for --quant
QUANTIZATION = {
    "w8a16": {"quant_algo": "W8A16", "kv_cache_quant_algo": None, "group_size": 128,
              "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None},
    "none": {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128,
             "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None},
}

# safetensors dtype codes
ST_DTYPES = {"int8": "I8", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def layer_name(layer: int, suffix: str) -> str:
    return LAYER_PREFIX.format(layer=layer) + suffix


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"
