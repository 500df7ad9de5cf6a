"""The per-element tolerance of a rank tensor against the source values it was made from (used by
check_stream's audit; check_shards documents it). Pure numpy, no torch:
- 0 where the values are the source's (float32 copies, the release's int8 codes and scales);
- the dtype's rounding where a value is cast (bf16 2^-8, f16 2^-11 relative);
- half a step of the stored per-channel scale (x 1.01) where the codes were requantised.
"""
from __future__ import annotations

import numpy as np

from grok_deploy.trtllm import names as tn

# relative rounding of a value stored in each dtype (round to nearest)
DTYPE_RTOL = {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def tolerance(name, part, exp, scales, quant, dtype, requantized) -> np.ndarray | float:
    """Allowed |rank value - source value|: per element, or broadcastable ((1, N): per column),
    or one number (0: the values must be the source's exactly)."""
    if part and quant == "w8a16" and part in requantized:
        return 0.5 * 1.01 * np.asarray(scales[name])[..., None, :]  # half a step of the stored scale
    if part and quant == "w8a16":  # the release's codes; scales exact in bf16 and f32
        return np.abs(exp) * DTYPE_RTOL["float16"] if dtype == "float16" else 0.0
    if name.endswith(tn.ROUTER) or dtype == "float32":
        return 0.0  # float32 copies
    return np.abs(exp) * DTYPE_RTOL[dtype] + (6e-8 if dtype == "float16" else 0.0)  # f16 subnormals
