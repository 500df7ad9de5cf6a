"""The onnxruntime-genai side of an exported (or built) folder: `genai_config.json` + tokenizer files.

`onnxruntime_genai.Model(folder)` reads `genai_config.json` (model type, decoder file, its I/O
names, head counts, search defaults) and `onnxruntime_genai.Tokenizer(model)` reads the Hugging
Face files `tokenizer.json` + `tokenizer_config.json` (grok_deploy.model.hf_tokenizer builds them
from Grok's SentencePiece model with the same ids). The graph's I/O already follows the genai
names (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.%d.key|value`, `present.%d.*`,
`logits`); `past_present_share_buffer` makes the generator bind one (B, kv_heads, max_length, dk)
buffer per cache as past and present, which is what GroupQueryAttention (and the standard graph's
ScatterND at position_ids) update in place. The attention mask genai passes is (B, total length):
the graph reads its first max(position_ids) + 1 slots, which is all of it.

Upstream read: an onnxruntime-genai test script that writes a tiny GroupQueryAttention decoder and
its genai_config.json ("tiny_gqa_model"), and onnxruntime-extensions'
operators/tokenizer/tokenizer_jsconfig.hpp (tokenizer_config.json fields, tokenizer_class -> BPE);
the keys are checked by onnxruntime-genai 0.18 loading the folder (tests/onnx/test_genai.py).
"""
from __future__ import annotations

import json
from pathlib import Path

GENAI_CONFIG = "genai_config.json"
MODEL_TYPE = "llama"  # any decoder-only type: genai's DecoderOnly model, nothing type-specific used


def genai_config(cfg, filename: str = "model.onnx", max_length: int | None = None,
                 session_options: dict | None = None) -> dict:
    """The genai_config.json dict for the decoder `filename` of config `cfg` (greedy defaults)."""
    max_length = max_length or cfg.sequence_len
    return {
        "model": {
            "type": MODEL_TYPE,
            "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
            "vocab_size": cfg.vocab_size, "context_length": cfg.sequence_len,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "grok-deploy", **(session_options or {})},
                "head_size": cfg.key_size, "hidden_size": cfg.emb_size,
                "num_attention_heads": cfg.num_q_heads, "num_key_value_heads": cfg.num_kv_heads,
                "num_hidden_layers": cfg.num_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits",
                            "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "min_length": 0, "max_length": max_length,
                   "past_present_share_buffer": True, "early_stopping": True},
    }


def write_genai_files(out, cfg, tokenizer_model=None, filename: str = "model.onnx",
                      session_options: dict | None = None) -> list[str]:
    """Write genai_config.json (+ the Hugging Face tokenizer files when `tokenizer_model` is given)
    into `out`; returns the names written."""
    from grok_deploy.model.hf_tokenizer import FILES, write_hf_tokenizer

    out = Path(out)
    (out / GENAI_CONFIG).write_text(json.dumps(genai_config(cfg, filename, session_options=session_options),
                                               indent=1) + "\n")
    written = [GENAI_CONFIG]
    if tokenizer_model is not None:
        write_hf_tokenizer(tokenizer_model, out)
        _genai_flavour(out)
        written += list(FILES)
    return written


def _genai_flavour(out: Path) -> None:
    """Rewrite the tokenizer files in the form onnxruntime-genai 0.18's tokenizer (onnxruntime-
    extensions) applies as SentencePiece does: a Llama-style normaliser (prepend U+2581, spaces ->
    U+2581), no pre-tokenizer, class LlamaTokenizer. Measured: the hf_tokenizer form (regex
    normalisers and pre-tokenizers) loads but merges nothing after the first piece; this form gives
    SentencePiece's ids on the verification prompts (tests/onnx/test_genai.py). Known differences:
    SentencePiece removes leading, trailing and repeated spaces, this form keeps them; genai's decode
    keeps the dummy prefix (one leading space) that SentencePiece strips."""
    tok_file, cfg_file = out / "tokenizer.json", out / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    tok["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tok["pre_tokenizer"] = None
    tok_file.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    conf = json.loads(cfg_file.read_text(encoding="utf-8"))
    conf["tokenizer_class"] = "LlamaTokenizer"
    cfg_file.write_text(json.dumps(conf, indent=1, ensure_ascii=False), encoding="utf-8")
