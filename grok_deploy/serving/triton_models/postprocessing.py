"""`postprocessing`: token ids -> text with the SentencePiece model (triton-serving.md §4).
Copied to postprocessing/1/model.py; self-contained (numpy + sentencepiece, or tokenizers):
`tokenizer_dir` holds `tokenizer.model` or a Hugging Face `tokenizer.json` folder (same text).

Stateless: a streamed chunk is decoded alone, so leading spaces and split multi-byte characters
are lost, as in the stock model. `tensorrt_llm_bls` with accumulate_tokens streams exact text.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json, read with the `tokenizers` library) behind the
    SentencePiece method names this model uses; control tokens ([EOS]...) never come out of text."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tok.encode_special_tokens = True  # "[EOS]" in a prompt is text, as in SentencePiece
        path = os.path.join(folder, "tokenizer_config.json")
        config = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
        self.named = {k: self.tok.token_to_id(config[k]) for k in ("bos_token", "eos_token", "pad_token")
                      if isinstance(config.get(k), str) and self.tok.token_to_id(config[k]) is not None}
        self.special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def EncodeAsIds(self, text: str) -> list:  # noqa: N802 - SentencePiece's names
        return self.tok.encode(text, add_special_tokens=False).ids

    def DecodeIds(self, ids) -> str:  # noqa: N802 - control tokens decode to nothing, as in SentencePiece
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def GetPieceSize(self) -> int:  # noqa: N802
        return self.tok.get_vocab_size()

    def IdToPiece(self, i: int) -> str:  # noqa: N802
        return self.tok.id_to_token(int(i))

    def IsControl(self, i: int) -> bool:  # noqa: N802
        return int(i) in self.special

    def bos_id(self) -> int:
        return self.named.get("bos_token", -1)

    def eos_id(self) -> int:
        return self.named.get("eos_token", -1)

    def pad_id(self) -> int:
        return self.named.get("pad_token", -1)


def load_tokenizer(folder: str):
    """SentencePiece `tokenizer.model` when the folder has one (the reference's own), else a Hugging
    Face `tokenizer.json` folder."""
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return HFTokenizer(folder)
    raise pb_utils.TritonModelException(f"{folder}: neither tokenizer.model (SentencePiece) nor tokenizer.json "
                                        "(Hugging Face); set the tokenizer_dir parameter")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], params["tokenizer_dir"])
        self.sp = load_tokenizer(folder)
        self.skip_special = params.get("skip_special_tokens", "true").strip().lower() in ("1", "true", "yes")
        self.vocab = self.sp.GetPieceSize()

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab]
        if self.skip_special:
            return self.sp.DecodeIds(ids)
        out, run = [], []
        for i in ids:  # control pieces ([EOS], [PAD]...) spelled out
            if self.sp.IsControl(i):
                out += [self.sp.DecodeIds(run), self.sp.IdToPiece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.DecodeIds(run)])

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # (B, beams, T)
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # (B, beams)
            lengths = lengths.reshape(tokens.shape[:2])
            # flat [batch * beams], as the backend's postprocessing: text_output comes back as [1]
            text = np.array([self.decode(tokens[b, k, :lengths[b, k]]).encode("utf-8")
                             for b in range(tokens.shape[0]) for k in range(tokens.shape[1])], dtype=object)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", text)]))
        return responses
