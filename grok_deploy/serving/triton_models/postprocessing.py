"""`postprocessing`: token ids -> text with the SentencePiece model (triton-serving.md §4).
Copied to postprocessing/1/model.py; self-contained (numpy + sentencepiece, or tokenizers):
`tokenizer_dir` holds `tokenizer.model` or a Hugging Face `tokenizer.json` folder (same text).

Stateless: a streamed chunk is decoded alone, so leading spaces and split multi-byte characters
are lost, as in the stock model. `tensorrt_llm_bls` with accumulate_tokens streams exact text.

Cancellation: Triton (2.51) does not tell a running ensemble step that its ensemble request was
cancelled (client gone, stream closed); it only marks the *next* steps, i.e. the postprocessing
requests of the tokens that follow. Seeing one, this model sends `tensorrt_llm` the backend's own
cancellation (`stop` with the request id, triton-serving.md §3), so that the sequence leaves the
batch at the next step instead of decoding to its end. The python tensorrt_llm also hands over
its sequence's random key (SEQUENCE_KEY); the stop names it, so that it ends that sequence only,
not another client's request that carries the same request id. (No dynamic batcher here: Triton's batcher
drops cancelled requests before `execute`, and the ensemble then stays "in flight" for ever.)
"""
import collections
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json, read with the `tokenizers` library) behind the
    SentencePiece method names this model uses (it only decodes)."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        path = os.path.join(folder, "tokenizer_config.json")
        config = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
        self.named = {k: self.tok.token_to_id(config[k]) for k in ("bos_token", "eos_token", "pad_token")
                      if isinstance(config.get(k), str) and self.tok.token_to_id(config[k]) is not None}
        self.special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

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
        self.stopped = collections.deque(maxlen=1024)  # (request id, key) already stopped (one stop each)

    def stop_generation(self, request_id: str, key=None) -> None:
        """Cancel the `tensorrt_llm` sequence of a cancelled ensemble request: by its id, and by
        its key when the model gave one (then only that sequence)."""
        if not request_id or (request_id, key) in self.stopped:
            return  # without an id the sequence runs to its end; its ensemble still completes
        self.stopped.append((request_id, key))
        zero = np.zeros((1, 1), np.int32)
        inputs = [pb_utils.Tensor("input_ids", zero), pb_utils.Tensor("input_lengths", zero),
                  pb_utils.Tensor("request_output_len", zero), pb_utils.Tensor("stop", np.ones((1, 1), np.bool_))]
        if key is not None:
            inputs.append(pb_utils.Tensor("grok_sequence_key", np.array([[key]], np.uint64)))
        stop = pb_utils.InferenceRequest(model_name="tensorrt_llm", request_id=request_id,
                                         requested_output_names=["output_ids"], inputs=inputs)
        try:
            for response in stop.exec(decoupled=True):
                if response.has_error():
                    pb_utils.Logger.log_warn(f"postprocessing: stop {request_id!r}: {response.error().message()}")
        except Exception as e:  # noqa: BLE001 - best effort: the request is gone either way
            pb_utils.Logger.log_warn(f"postprocessing: stop {request_id!r} failed: {e}")

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
            if request.is_cancelled():
                key = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_KEY")
                self.stop_generation(request.request_id(), None if key is None else int(key.as_numpy().reshape(-1)[0]))
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # (B, beams, T)
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # (B, beams)
            lengths = lengths.reshape(tokens.shape[:2])
            # flat [batch * beams], as the backend's postprocessing: text_output comes back as [1]
            text = np.array([self.decode(tokens[b, k, :lengths[b, k]]).encode("utf-8")
                             for b in range(tokens.shape[0]) for k in range(tokens.shape[1])], dtype=object)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", text)]))
        return responses
