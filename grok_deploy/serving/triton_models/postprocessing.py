"""`postprocessing`: token ids -> text with the SentencePiece model (triton-serving.md §4).
Copied to postprocessing/1/model.py; self-contained (numpy + sentencepiece).

Stateless: a streamed chunk is decoded alone, so leading spaces and split multi-byte characters
are lost, as in the stock model. `tensorrt_llm_bls` with accumulate_tokens streams exact text.
"""
import json
import os

import numpy as np
import sentencepiece as spm
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], params["tokenizer_dir"])
        self.sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
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
            text = np.empty(tokens.shape[:2], dtype=object)
            for b in range(tokens.shape[0]):
                for k in range(tokens.shape[1]):
                    text[b, k] = self.decode(tokens[b, k, :lengths[b, k]]).encode("utf-8")
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", text)]))
        return responses
