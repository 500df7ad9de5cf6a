"""The checkpoint room: readers of the official format and the Hugging Face port, the official
format's writer and make-tiny, the pickle reader that never unpickles, and `inspect`. Every reader
yields the canonical layout of docs/ARCHITECTURE.md. Imports the model room and the ground floor.

    ckpt = open_checkpoint(path, preset=None)
    ckpt.format, ckpt.config, ckpt.tokenizer_path
    ckpt.infos(); ckpt.read(name); ckpt.read_expert(name, e); ckpt.read_raw(name); ckpt.params()
"""
from __future__ import annotations

from pathlib import Path

from grok_deploy.checkpoint.base import Checkpoint, TensorInfo
from grok_deploy.checkpoint.xai import CKPT_DIR, QuantizedWeight8bit, dequantize, quantize_blocks, write_checkpoint
from grok_deploy.errors import UserError
from grok_deploy.model.config import GrokConfig
from grok_deploy.model.tokenizer import check_tokenizer_file

__all__ = ["Checkpoint", "QuantizedWeight8bit", "TensorInfo", "dequantize", "open_checkpoint",
           "quantize_blocks", "write_checkpoint"]

TOKENIZER = "tokenizer.model"


def open_checkpoint(path, preset: str | GrokConfig | None = None) -> Checkpoint:
    """Open a folder holding `ckpt-0/` (official release) or `*.safetensors` (hpcai-tech port),
    plus `tokenizer.model`.

    The config is the preset given (checked against the tensor shapes) or the preset whose sizes
    match them. Raises UserError naming the path for anything missing, corrupt or ambiguous.
    """
    if "\0" in str(path):
        raise UserError(f"{str(path)!r}: the checkpoint path contains a NUL character")
    path = Path(path)
    if path.name == CKPT_DIR and not (path / CKPT_DIR).is_dir() and path.is_dir():
        path = path.parent  # pointed at ckpt-0/ itself
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint folder")
    is_xai = (path / CKPT_DIR).is_dir()
    if not is_xai and not any(path.glob("*.safetensors")):
        hint = "; the loader expects the folder name ckpt-0/, not ckpt/" if (path / "ckpt").is_dir() else ""
        raise UserError(f"{path}: holds neither {CKPT_DIR}/ (official release) nor *.safetensors "
                        f"(Hugging Face port){hint}")
    tokenizer = path / TOKENIZER
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: missing; copy tokenizer.model from the root of the "
                        "xai-org/grok-1 repository next to the weights")
    check_tokenizer_file(tokenizer)
    if is_xai:
        from grok_deploy.checkpoint.xai import open_xai

        return open_xai(path, tokenizer, preset)
    from grok_deploy.checkpoint.hf import open_hf

    return open_hf(path, tokenizer, preset)
