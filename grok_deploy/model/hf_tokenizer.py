"""A Hugging Face tokenizer folder built from Grok's SentencePiece `tokenizer.model`, with the same
token ids (tested against SentencePiece on the verification prompts and a unicode corpus).

The backend's preprocessing and genai-perf call `AutoTokenizer.from_pretrained(folder)`; a raw
SentencePiece file is not such a folder. `write_hf_tokenizer` writes `tokenizer.json` (built with
the `tokenizers` library alone) plus `tokenizer_config.json` / `special_tokens_map.json`, with NO
BOS or EOS added (Grok's runner adds none). The text of a control piece (`[EOS]`...) is that token,
in AutoTokenizer and here alike (the rule of docs/serving.md). The pipeline mirrors SentencePiece
BPE as the model file configures it:
- normaliser: identity (a precompiled charsmap is applied when the model has one), optional
  removal of extra spaces, spaces escaped as U+2581;
- the dummy prefix (`add_dummy_prefix`) prepended after that; then user-defined pieces isolated
  whole (SentencePiece emits them as they are and never merges them);
- model: BPE over the normal pieces, merges ranked by piece score, byte fallback;
- decoder: U+2581 -> space, byte pieces -> UTF-8, the dummy prefix stripped.

The model file is read with a small protobuf wire reader (`read_spm_proto`): the sentencepiece
wheel's generated `sentencepiece_model_pb2` refuses the protobuf runtime tritonclient pins.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from grok_deploy.errors import UserError
from grok_deploy.model.tokenizer import read_tokenizer_bytes

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class SpmModel:
    """The parts of a SentencePiece ModelProto the conversion needs."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type) by id
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return out, i


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value is int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, value


def read_spm_proto(data: bytes) -> SpmModel:
    """ModelProto: pieces = 1 (piece 1, score 2, type 3), normalizer_spec = 3 (precompiled_charsmap 2,
    add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5)."""
    m = SpmModel()
    for num, wire, value in _fields(data):
        if num == 1 and wire == 2:
            piece, score, kind = "", 0.0, NORMAL
            for n, w, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            m.pieces.append((piece, score, kind))
        elif num == 3 and wire == 2:
            for n, w, v in _fields(value):
                if n == 2:
                    m.precompiled_charsmap = bytes(v)
                elif n in (3, 4, 5) and w == 0:
                    setattr(m, {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[n], bool(v))
    if not m.pieces:
        raise ValueError("no pieces")
    return m


def build_tokenizer(m: SpmModel):
    """A `tokenizers.Tokenizer` that encodes and decodes as SentencePiece does for this model."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    byte_fallback = any(t == BYTE for _, _, t in m.pieces)
    vocab = {p: i for i, (p, _, _) in enumerate(m.pieces)}
    normal = {p: (s, i) for i, (p, s, t) in enumerate(m.pieces) if t == NORMAL}
    ranked = sorted((-normal[p][0], normal[p][1], p[:k], p[k:]) for p in normal for k in range(1, len(p))
                    if p[:k] in normal and p[k:] in normal)  # the merged piece's score decides the order
    unk = next((p for p, _, t in m.pieces if t == UNKNOWN), None)
    user_defined = [p for p, _, t in m.pieces if t == USER_DEFINED]
    # ignore_merges: an isolated user-defined piece maps to its id (it has no merges)
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=unk, fuse_unk=True,
                        byte_fallback=byte_fallback, ignore_merges=bool(user_defined)))
    norm = [normalizers.Precompiled(m.precompiled_charsmap)] if m.precompiled_charsmap else []
    if m.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines and tabs alone
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if m.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "\u2581"))
    if m.add_dummy_prefix:  # after the stripping, always (also before a U+2581), as SentencePiece
        norm.append(normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    if user_defined:  # isolated whole, after the dummy prefix, and never merged (as SentencePiece)
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        # ignore_merges would map a section that IS a control piece ("[EOS]" right after a
        # user-defined piece) to its id, which text never reaches in SentencePiece: split off its
        # first character
        control = [p for p, _, t in m.pieces if t in (CONTROL, UNKNOWN, UNUSED, BYTE) and len(p) > 1]
        guard = "|".join(rf"\A{re.escape(p[0])}(?={re.escape(p[1:])}\z)" for p in control)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated")]
            + ([pre_tokenizers.Split(Regex(guard), behavior="isolated")] if guard else []))
    dec = [decoders.Replace("\u2581", " ")] + ([decoders.ByteFallback()] if byte_fallback else [])
    dec += [decoders.Fuse()] + ([decoders.Strip(content=" ", left=1)] if m.add_dummy_prefix else [])
    tok.decoder = decoders.Sequence(dec)
    return tok


def write_hf_tokenizer(model_file, out) -> Path:
    """`out`/tokenizer.json + tokenizer_config.json + special_tokens_map.json for `model_file`."""
    from tokenizers import AddedToken

    model_file, out = Path(model_file), Path(out)
    try:
        m = read_spm_proto(read_tokenizer_bytes(model_file))
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise UserError(f"{model_file}: not a SentencePiece model ({e}); pass the checkpoint's tokenizer.model") from None
    tok = build_tokenizer(m)
    control = [p for p, _, t in m.pieces if t in (CONTROL, UNKNOWN)]
    # special, so that decoding can skip them; matched in text (split_special_tokens false), so that
    # the backend's tools' `encode(eos_token, add_special_tokens=False)[0]` is 2 and the pad idiom 0:
    # the rule for special-token text (docs/serving.md) that the reference and preprocessing follow
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    named = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]"}
    named = {k: v for k, v in named.items() if v in control}
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "split_special_tokens": False, "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30,
              "legacy": False, "padding_side": "left", **named}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(named, indent=1))
    return out
