"""What every checkpoint reader offers, and how a reader finds its model config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from grok_deploy.errors import UserError
from grok_deploy.model import names
from grok_deploy.model.config import PRESETS, GrokConfig

CHUNK = 1 << 24  # elements per finiteness check: 64 MiB of float32 at a time

# The sizes a reader measures from tensor shapes, in the order they are reported.
DIMS = ("vocab_size", "emb_size", "num_layers", "q_size", "kv_size", "ffn_size")


@dataclass(frozen=True)
class TensorInfo:
    """One canonical leaf as stored: shape and dtype of the stored (int8 or float) array."""

    name: str
    shape: tuple[int, ...]
    dtype: str                       # "float32", "int8" (quantised weight), "bfloat16", ...
    quantized: bool
    file: str                        # relative to the checkpoint folder: "ckpt-0/tensor00026_000"
    scale_shape: tuple[int, ...] | None = None


class Checkpoint:
    """A checkpoint in the canonical layout (docs/ARCHITECTURE.md): Haiku paths, [in, out]
    matrices, experts stacked on axis 0. Subclasses implement `infos`, `read`, `read_expert`,
    `read_raw`."""

    format: str
    config: GrokConfig
    path: Path
    tokenizer_path: Path

    def names(self) -> list[str]:
        """Leaf paths in flatten order."""
        return names.flatten_order(self.config.num_layers)

    def params(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, float32 array) for every leaf, one at a time, in flatten order.

        Drop each array (`del`) before asking for the next one to hold a single tensor at a time.
        """
        for name in self.names():
            arr = self.read(name)
            check_finite(self.path, name, arr)
            yield name, arr

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows lo:hi of a 2-D leaf (the embedding), float32; readers that can read only those
        bytes override this, so a block of the vocabulary never needs the whole table in memory."""
        return np.ascontiguousarray(self.read(name)[lo:hi])

    def _expert_check(self, name: str, e: int) -> None:
        if len(names.leaf_shape(self.config, name)) != 3:
            raise ValueError(f"{name} is not a stacked expert leaf")
        if not 0 <= e < self.config.num_experts:
            raise ValueError(f"expert {e} out of range 0..{self.config.num_experts - 1}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.config.name} at {self.path}>"


def match_config(where, found: dict[str, int], preset: str | GrokConfig | None) -> GrokConfig:
    """The config whose sizes equal `found` (measured from the files): the preset given, checked,
    or the one preset that matches. Raises UserError naming `where` otherwise."""
    def sizes(cfg: GrokConfig) -> dict[str, int]:
        return {k: getattr(cfg, k) for k in DIMS}

    shown = ", ".join(f"{k} {found[k]}" for k in DIMS)
    if preset is not None:
        cfg = preset if isinstance(preset, GrokConfig) else GrokConfig.from_name(preset)
        want = sizes(cfg)
        bad = [f"{k} {found[k]} (preset: {want[k]})" for k in DIMS if found[k] != want[k]]
        if bad:
            raise UserError(f"{where}: tensor shapes do not match preset {cfg.name}: {', '.join(bad)}; "
                            "pass the preset this checkpoint was made with")
        return cfg
    for cfg in PRESETS.values():
        if sizes(cfg) == found:
            return cfg
    raise UserError(f"{where}: tensor shapes ({shown}) match no preset ({', '.join(sorted(PRESETS))}); "
                    "pass the preset explicitly (--preset / model.preset)")


def count_non_finite(arr) -> int:
    """NaN and inf values in a float array (int8 codes: 0), counted CHUNK elements at a time."""
    flat = np.asarray(arr).reshape(-1)
    if flat.dtype.kind not in "fc" and flat.dtype.name != "bfloat16":
        return 0
    count = 0
    for a in range(0, flat.size, CHUNK):
        part = flat[a:a + CHUNK]
        count += int(part.size - np.count_nonzero(np.isfinite(part)))
    return count


def check_finite(where, name: str, arr) -> None:
    """UserError (inspect's message) when the weights `arr` of leaf `name` hold NaN or inf: every
    command that loads weights refuses them (one NaN makes every logit NaN)."""
    count = count_non_finite(arr)
    if count:
        raise UserError(non_finite_message(where, {name: count}))


def non_finite_message(where, bad: dict[str, int]) -> str:
    shown = ", ".join(f"{n} ({c} values)" for n, c in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"{where}: {len(bad)} tensors hold NaN or inf values: {shown}{more}; the checkpoint is corrupt, "
            "download those files again")
