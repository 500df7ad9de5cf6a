"""SentencePiece tokenizer: Grok's raw `tokenizer.model`, and the tiny one that make-tiny trains.

Grok's runner calls `encode(prompt)`, which adds no BOS and no EOS; so does this wrapper.
Special-token text (docs/serving.md): the text of a control token (`[PAD]`, `[BOS]`, `[EOS]`,
`[UNK]`) in a prompt IS that token, as AutoTokenizer treats it on the packaged Hugging Face folder
and as the preprocessing model serves it; the text around it is encoded as usual, piece by piece.
"""
from __future__ import annotations

import errno
import io
import os
import random
import re
import stat
import sys
from pathlib import Path

from grok_deploy.errors import UserError
from grok_deploy.model.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID

_WORDS = Path(__file__).with_name("data") / "words.txt"
MAX_TOKENIZER_BYTES = 64 << 20  # Grok-1's tokenizer.model is 2.2 MB (131072 pieces)


class Tokenizer:
    """encode(text) -> ids without BOS/EOS; decode(ids) reassembles byte pieces into UTF-8."""

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise UserError(f"{source}: not a SentencePiece model ({e}); pass the checkpoint's tokenizer.model") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.special = special_pieces(self.sp)
        # longest first, as a trie's leftmost-longest match: a capturing split keeps the matches
        self._split = re.compile("(" + "|".join(re.escape(p) for p in sorted(self.special, key=len, reverse=True))
                                 + ")") if self.special else None

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS; special-token text is the token (the module docstring)."""
        if self._split is None:
            return list(self.sp.EncodeAsIds(text))
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):  # text, special, text, ...
            if k % 2:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.EncodeAsIds(part)
        return ids

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))


def special_pieces(sp) -> dict[str, int]:
    """{piece: id} of the control and unknown pieces ([PAD], [BOS], [EOS], [UNK]): the special tokens
    of the Hugging Face folder (hf_tokenizer.py), which SentencePiece never makes from text."""
    return {sp.IdToPiece(i): i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)}


def load_tokenizer(path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer not found; put tokenizer.model beside ckpt-0/ or set model.source.tokenizer")
    return Tokenizer(read_tokenizer_bytes(path), str(path))


def _too_big(path: Path, size: int) -> UserError:
    return UserError(f"{path}: {size} bytes, larger than any SentencePiece model (Grok-1's tokenizer.model is "
                     f"2.2 MB; at most {MAX_TOKENIZER_BYTES} are read); pass the checkpoint's tokenizer.model")


def check_tokenizer_file(path) -> None:
    """Refuse, from its size alone, a tokenizer.model no SentencePiece model could be (an 8 GB
    sparse file was read whole: MemoryError)."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return  # missing or unreadable: the reader names it
    if size > MAX_TOKENIZER_BYTES:
        raise _too_big(Path(path), size)


def read_tokenizer_bytes(path) -> bytes:
    """The bytes of a tokenizer.model: a regular file of at most MAX_TOKENIZER_BYTES, checked
    before it is read (a FIFO or a device is refused unread, so nothing blocks or fills memory)."""
    path = Path(path)
    try:
        with open(path, "rb", opener=lambda p, fl: os.open(p, fl | os.O_NONBLOCK)) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{path}: not a regular file (a FIFO, socket or device); pass the checkpoint's "
                                "tokenizer.model")
            if st.st_size > MAX_TOKENIZER_BYTES:
                raise _too_big(path, st.st_size)
            data = f.read(MAX_TOKENIZER_BYTES + 1)
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; pass the checkpoint's tokenizer.model") from None
    except OSError as e:
        why = "a symlink loop" if e.errno == errno.ELOOP else e.strerror
        raise UserError(f"{path}: cannot read the tokenizer ({why}); pass the checkpoint's tokenizer.model") from None
    if len(data) > MAX_TOKENIZER_BYTES:  # it grew after the check
        raise _too_big(path, len(data))
    return data


def tiny_corpus(seed: int, sentences: int = 4000) -> list[str]:
    """Deterministic English-like text for training the tiny tokenizer (the words ship as data)."""
    words = _WORDS.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    lines = ["The answer to life the universe and everything is of course 42.",
             "Grok-1 is a mixture of 8 experts, and 2 of them are active for each token.",
             "Naïve café résumé: ünïcödé text, 3.14159 and 2,718 — with émojis 🙂 too."]
    for _ in range(sentences):
        n = rng.randint(4, 16)
        sent = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.2:
            sent += f" {rng.randint(0, 9999)}"
        lines.append(sent[0].upper() + sent[1:] + rng.choice(".!?,;"))
    return lines


def train_tiny_tokenizer(vocab_size: int, seed: int) -> bytes:
    """A real SentencePiece BPE model with Grok's special ids and byte fallback; same seed, same bytes."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed)), model_writer=out,
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
        user_defined_symbols=["<|separator|>", "<|mask|>"],
        byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", num_threads=1, minloglevel=2,
        max_sentence_length=4096, hard_vocab_limit=False,
    )
    return out.getvalue()


def fit_context(ids: list[int], context: int, what: str, echo=None) -> list[int]:
    """Left-truncate a prompt longer than the context, as the original runner does, with a warning."""
    if len(ids) <= context:
        return ids
    msg = (f"warning: {what} is {len(ids)} tokens, longer than the context of {context}; "
           f"keeping its last {context} tokens, as the original does")
    (echo or (lambda m: print(m, file=sys.stderr)))(msg)
    return ids[-context:]
