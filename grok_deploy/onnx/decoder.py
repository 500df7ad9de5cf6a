"""build_model: the decoder ModelProto, on ONNX Runtime's fused operators (fused.py) or on
standard ops only (graph.py); both builders share graph.py's DecoderBuilder."""
from __future__ import annotations

from pathlib import Path

import onnx

from grok_deploy.model.config import GrokConfig
from grok_deploy.onnx import BLOCK_SIZE
from grok_deploy.onnx.fused import FusedDecoderBuilder
from grok_deploy.onnx.graph import DecoderBuilder, WeightWriter


def build_model(cfg: GrokConfig, src, data_path: Path | None, quant: str = "none", block: int = BLOCK_SIZE,
                layers: int | None = None, graph: str = "fused") -> onnx.ModelProto:
    """The decoder ModelProto; weights go to `data_path` (None: shapes only, nothing read).
    `graph`: "fused" (ONNX Runtime's fused operators, fused.py) or "standard" (standard ops only)."""
    builders = {"fused": FusedDecoderBuilder, "standard": DecoderBuilder}  # export.GRAPHS, checked there
    if graph not in builders:
        raise ValueError(f"graph must be one of {tuple(builders)}, got {graph!r}")
    builder = builders[graph]
    writer = WeightWriter(data_path)
    try:
        return builder(cfg, src, writer, quant, block).build(layers)
    finally:
        writer.close()
