"""`preprocessing`: text -> token ids with Grok's SentencePiece model, loaded directly (no HF
wrapper) and with NO BOS, as Grok's runner (triton-serving.md §2). Copied to preprocessing/1/model.py.

Self-contained (numpy + sentencepiece, or tokenizers): `tokenizer_dir` (relative to the model's
folder, or absolute) holds `tokenizer.model`, or a Hugging Face folder (`tokenizer.json`, as the
package stage writes beside it: grok_deploy/model/hf_tokenizer.py), which gives the same ids.
Prompts are right-padded with pad_id; word lists become [2, N] (ids, end offsets, -1 padded).
Special-token text (docs/serving.md): the text of a control token ([PAD], [BOS], [EOS], [UNK]) in a
prompt or a word IS that token, as AutoTokenizer on the Hugging Face folder and the reference
(grok_deploy/model/tokenizer.py) have it; the text around it is encoded as usual.
Sizes are bounded before anything is tokenized (INVALID_ARG naming the input): a prompt's bytes,
and the count and bytes of the stop / bad / embedding-bias word lists (tensorrt_llm checks its
word lists at every decode step of the shared batch: params.MAX_WORDS, MAX_WORD_TOKENS).
"""
import json
import os
import re

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_PROMPT_BYTES = 1 << 20  # per text_input row: far above max_input_len tokens of text
MAX_WORDS = 1024            # per bad_words / stop_words / embedding_bias_words row (= params.MAX_WORDS)
MAX_WORD_BYTES = 1 << 16    # all the words of one such row


def check_size(a, name: str, batch: int, max_count: int | None, max_bytes: int) -> None:
    """ValueError (INVALID_ARG) when a row of the BYTES input `name` has more than `max_count`
    entries or `max_bytes` bytes in all."""
    if a is None:
        return
    for row in np.asarray(a).reshape(batch, -1):
        if max_count is not None and row.size > max_count:
            raise ValueError(f"{name}: {row.size} words; at most {max_count} per request row")
        size = sum(len(x) if isinstance(x, (bytes, str)) else 0 for x in row)
        if size > max_bytes:
            raise ValueError(f"{name}: {size} bytes; at most {max_bytes} per request row")


def truthy(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "t", "y")


def texts(a) -> list:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1)]


def one_spelling(new, old, new_name: str, old_name: str):
    """The value of an input sent under its 1.x name (`new`) or its <= v0.19 name (`old`), or None;
    both sent and different is refused, as the python tensorrt_llm model refuses it."""
    if new is not None and old is not None and not np.array_equal(new, old):
        raise ValueError(f"inputs '{old_name}' and '{new_name}' are two spellings of one input and differ; send one")
    return new if new is not None else old


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json, read with the `tokenizers` library) behind the
    SentencePiece method names this model uses; special-token text is the token (its added tokens)."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tok.encode_special_tokens = False  # "[EOS]" in a prompt is id 2, as AutoTokenizer has it
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


class SpecialText:
    """A SentencePieceProcessor whose EncodeAsIds makes the text of a control or unknown piece that
    piece's id and encodes the text between as usual (the rule above); the rest is SentencePiece's."""

    def __init__(self, sp):
        self.sp = sp
        self.special = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)}
        names = sorted(self.special, key=len, reverse=True)  # longest first, as a leftmost-longest trie
        self.split = re.compile("(" + "|".join(re.escape(p) for p in names) + ")") if names else None

    def EncodeAsIds(self, text: str) -> list:  # noqa: N802 - SentencePiece's names
        if self.split is None:
            return list(self.sp.EncodeAsIds(text))
        ids = []
        for k, part in enumerate(self.split.split(text)):  # text, special, text, ...
            if k % 2:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.EncodeAsIds(part)
        return ids

    def __getattr__(self, name):
        return getattr(self.sp, name)


def load_tokenizer(folder: str):
    """SentencePiece `tokenizer.model` when the folder has one (the reference's own), else a Hugging
    Face `tokenizer.json` folder."""
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        import sentencepiece as spm

        return SpecialText(spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model")))
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
        self.add_bos = truthy(params.get("add_special_tokens", "false"))  # package writes false for Grok
        self.vocab = self.sp.GetPieceSize()
        self.end_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.end_id

    def encode(self, text: str) -> list:
        return ([self.sp.bos_id()] if self.add_bos else []) + list(self.sp.EncodeAsIds(text))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._one(request)))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
        return responses

    def _one(self, request) -> list:
        def get(name):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        queries = get("QUERY")
        batch = queries.shape[0]
        check_size(queries, "text_input", batch, None, MAX_PROMPT_BYTES)
        check_size(get("DECODER_QUERY"), "decoder_text_input", batch, None, MAX_PROMPT_BYTES)
        for tensor, name in (("BAD_WORDS_DICT", "bad_words"), ("STOP_WORDS_DICT", "stop_words"),
                             ("EMBEDDING_BIAS_WORDS", "embedding_bias_words")):
            check_size(get(tensor), name, batch, MAX_WORDS, MAX_WORD_BYTES)
        ids = [self.encode(t) for t in texts(queries)]
        if any(not x for x in ids):
            raise ValueError("text_input encodes to no tokens; send a non-empty prompt")
        end = get("END_ID")
        pad = get("PAD_ID")
        end = np.full((batch, 1), self.end_id, np.int32) if end is None else end.astype(np.int32)
        pad = np.full((batch, 1), self.pad_id, np.int32) if pad is None else pad.astype(np.int32)
        out = {"INPUT_ID": self.padded(ids, pad), "REQUEST_INPUT_LEN": np.array([[len(x)] for x in ids], np.int32),
               "REQUEST_OUTPUT_LEN": get("REQUEST_OUTPUT_LEN").astype(np.int32),
               "BAD_WORDS_IDS": self.word_list(get("BAD_WORDS_DICT"), batch),
               "STOP_WORDS_IDS": self.word_list(get("STOP_WORDS_DICT"), batch),
               "EMBEDDING_BIAS": self.bias(get("EMBEDDING_BIAS_WORDS"), get("EMBEDDING_BIAS_WEIGHTS"), batch),
               "OUT_END_ID": end, "OUT_PAD_ID": pad}
        decoder = get("DECODER_QUERY")
        if decoder is not None:
            dec = [self.encode(t) for t in texts(decoder)]
            out["DECODER_INPUT_ID"] = self.padded(dec, pad)
            out["REQUEST_DECODER_INPUT_LEN"] = np.array([[len(x)] for x in dec], np.int32)
        else:
            out["DECODER_INPUT_ID"] = pad.copy()
            out["REQUEST_DECODER_INPUT_LEN"] = np.ones((batch, 1), np.int32)
        for new, old, out_name in (("MIN_TOKENS", "MIN_LENGTH", "OUT_MIN_TOKENS"), ("SEED", "RANDOM_SEED", "OUT_SEED")):
            value = one_spelling(get(new), get(old), new.lower(), old.lower())
            if value is not None:  # absent: tensorrt_llm gets no such input, its default applies
                out[out_name] = value
        extra = get("PROMPT_TABLE_EXTRA_ID")
        if extra is not None:  # ids >= vocab address the prompt table; others get 0
            tab = out["INPUT_ID"]
            out["OUT_PROMPT_TABLE_EXTRA_IDS"] = np.where(tab >= self.vocab, extra.reshape(batch, 1), 0).astype(np.uint64)
        return [pb_utils.Tensor(k, v) for k, v in out.items()]

    @staticmethod
    def padded(rows: list, pad: np.ndarray) -> np.ndarray:
        width = max(len(r) for r in rows)
        out = np.empty((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            out[i] = pad[i, 0]
            out[i, :len(r)] = r
        return out

    def word_list(self, words, batch: int) -> np.ndarray:
        """[batch, 2, N]: row 0 the flat ids of every word, row 1 cumulative end offsets, -1 padded."""
        if words is None:
            return np.zeros((batch, 2, 0), np.int32)
        flat, offsets = [], []
        for row in words.reshape(batch, -1):
            ids, ends = [], []
            for w in texts(row):
                if w:
                    ids += list(self.sp.EncodeAsIds(w))
                    ends.append(len(ids))
            flat.append(ids)
            offsets.append(ends)
        n = max([len(f) for f in flat] + [1])
        out = np.full((batch, 2, n), -1, np.int32)
        out[:, 0] = 0
        for i, (ids, ends) in enumerate(zip(flat, offsets)):
            out[i, 0, :len(ids)] = ids
            out[i, 1, :len(ends)] = ends
        return out

    def bias(self, words, weights, batch: int) -> np.ndarray:
        if words is None or weights is None:
            return np.zeros((batch, 0), np.float32)
        words, weights = words.reshape(batch, -1), weights.reshape(batch, -1)
        if words.shape != weights.shape:
            raise ValueError(f"embedding_bias_words {list(words.shape)} and _weights {list(weights.shape)} differ")
        out = np.zeros((batch, self.vocab), np.float32)
        for i in range(batch):
            for w, weight in zip(texts(words[i]), weights[i]):
                for t in self.sp.EncodeAsIds(w) if w else []:
                    out[i, t] += weight
        return out
