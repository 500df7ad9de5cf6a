"""Model configuration: one typed dataclass and a table of named presets.

grok-1-tiny and grok-1-bench are for the CPU checks (head size 16 and 64, widths TensorRT-LLM
pads from 0.14); grok-1-smoke is the small one TensorRT-LLM builds (trtllm/compat.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from grok_deploy.errors import UserError

# Constants that TensorRT-LLM hard-codes for Grok, kept by every preset (grok1-model.md §1, §8).
EMBEDDING_MULTIPLIER = 78.38367176906169
OUTPUT_MULTIPLIER = 0.5773502691896257
MAX_ATTN_VALUE = 30.0
ROPE_BASE = 10000.0
NORM_EPS = 1e-5
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Per-expert FFN width as the original computes it: ceil8(int(w * D) * 2 // 3)."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (-size) % 8


@dataclass(frozen=True)
class GrokConfig:
    """Grok-1 hyper-parameters. Derived sizes are properties, computed as the original does."""

    name: str
    vocab_size: int
    emb_size: int
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    widening_factor: float
    num_experts: int = 8
    num_selected_experts: int = 2
    sequence_len: int = 8192
    embedding_multiplier: float = EMBEDDING_MULTIPLIER
    output_multiplier: float = OUTPUT_MULTIPLIER
    max_attn_value: float = MAX_ATTN_VALUE
    rope_base: float = ROPE_BASE
    norm_eps: float = NORM_EPS
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self) -> None:
        for f in ("vocab_size", "emb_size", "key_size", "num_q_heads", "num_kv_heads",
                  "num_layers", "num_experts", "num_selected_experts", "sequence_len"):
            if getattr(self, f) <= 0:
                raise UserError(f"model config {self.name}: {f} must be positive, got {getattr(self, f)}")
        if self.num_q_heads % self.num_kv_heads:
            raise UserError(
                f"model config {self.name}: num_q_heads {self.num_q_heads} is not divisible by "
                f"num_kv_heads {self.num_kv_heads}; use a multiple of the KV head count")
        if self.key_size % 2:
            raise UserError(f"model config {self.name}: key_size {self.key_size} must be even for RoPE")
        if self.num_experts != 8:
            raise UserError(f"model config {self.name}: num_experts must be 8 (the original hard-codes it), "
                            f"got {self.num_experts}")
        if not 0 < self.num_selected_experts <= self.num_experts:
            raise UserError(f"model config {self.name}: num_selected_experts must be in 1..{self.num_experts}")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.key_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.key_size

    @property
    def group_size(self) -> int:
        """Query heads per KV head: query head j uses KV head j // group_size."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.key_size)

    def param_count(self) -> int:
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        per_layer = 3 * e * d * f + 2 * d * self.q_size + 2 * d * self.kv_size + d * e + 4 * d
        return self.vocab_size * d + d + self.num_layers * per_layer

    def active_param_count(self) -> int:
        """Parameters read per generated token (two experts, tied embedding row + unembedding)."""
        d, f, k = self.emb_size, self.ffn_size, self.num_selected_experts
        per_layer = 3 * k * d * f + 2 * d * self.q_size + 2 * d * self.kv_size + d * self.num_experts + 4 * d
        return self.num_layers * per_layer + self.vocab_size * d

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["ffn_size"] = self.ffn_size
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "GrokConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GrokConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


PRESETS: dict[str, GrokConfig] = {
    c.name: c for c in (
        GrokConfig("grok-1", vocab_size=131072, emb_size=6144, key_size=128, num_q_heads=48,
                   num_kv_heads=8, num_layers=64, widening_factor=8),
        GrokConfig("grok-1-tiny", vocab_size=1024, emb_size=256, key_size=16, num_q_heads=16,
                   num_kv_heads=8, num_layers=12, widening_factor=2, sequence_len=1024),
        GrokConfig("grok-1-bench", vocab_size=4096, emb_size=1024, key_size=64, num_q_heads=16,
                   num_kv_heads=8, num_layers=8, widening_factor=8, sequence_len=2048),
        # the GPU smoke test of the whole TensorRT-LLM path, built and served in minutes: head size
        # 128 (the soft-capped kernels take 128 or 256), every weight-only width (hidden 512, qkv
        # 4096, dense in 2048, ffn 1024) a multiple of 64 x 8, so no TensorRT-LLM version pads it
        # at any tp up to 8; 4 layers, 8 experts top-2 (trtllm/compat.py)
        GrokConfig("grok-1-smoke", vocab_size=1024, emb_size=512, key_size=128, num_q_heads=16,
                   num_kv_heads=8, num_layers=4, widening_factor=3, sequence_len=2048),
    )
}
DEFAULT_PRESET = "grok-1-tiny"
