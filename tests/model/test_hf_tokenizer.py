"""The Hugging Face tokenizer folder built from the SentencePiece model: the reference's ids (the
rule for special-token text included) and text on the verification prompts and a unicode corpus,
with the tiny model and a Grok-like one (Grok's user-defined pieces: newline/tab/space runs, digits,
control markers; no extra-space removal); the backend tools' eos/pad idiom gives 2 / 0."""
from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import yaml

from grok_deploy.errors import UserError
from grok_deploy.model.hf_tokenizer import BYTE, CONTROL, USER_DEFINED, read_spm_proto, write_hf_tokenizer

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline.yaml"
ALPHABET = (list("abcdefghijklmnopqrstuvwxyz ABC  \n\t.,;!?0123456789-—'\"") + list("éüïçñ中文日本語한국어Ελληνικάрусский🙂🚀∑√")
            + ["<|mask|>", "[EOS]", "[BOS]", "[PAD]", "[UNK]", "[EOS", "<0x41>", "\u00a0", "\u200b", "\r\n", "   ",
               "\n\n\n", "\t\t"])


def corpus(n: int = 1500) -> list[str]:
    rng = random.Random(0)
    texts = list(yaml.safe_load(PIPELINE.read_text())["verify"]["prompts"])
    texts += ["", " ", "  leading and  double  spaces ", "a\n\n b", "12 345", " 7", "<|mask|>[EOS]", "x<|mask|>y",
              "line\nbreak\n\n\ttab", "Naïve café 中文 and 🙂 ok", "[EOS]", "Hello [EOS] world[PAD]x",
              " [BOS]  [UNK]\n", "[[EOS]]", "[PAD][EOS]"]
    return texts + ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def groklike(tmp_path_factory) -> Path:
    """A SentencePiece BPE model trained with Grok-1's settings and user-defined pieces (§10)."""
    import sentencepiece as spm

    from grok_deploy.model.tokenizer import tiny_corpus

    ud = (["\n" * k for k in range(1, 11)] + [str(d) for d in range(10)] + ["\t" * k for k in range(1, 9)]
          + [" " * k for k in range(2, 17)] + ["<|separator|>", "<|mask|>"] + [f"<|control{i}|>" for i in range(1, 21)])
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(0, 1500)), model_writer=out, model_type="bpe", vocab_size=900,
        character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[BOS]",
        eos_piece="[EOS]", unk_piece="[UNK]", user_defined_symbols=ud, byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
        minloglevel=2, max_sentence_length=4096, hard_vocab_limit=False)
    path = tmp_path_factory.mktemp("groklike") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


@pytest.mark.parametrize("which", ["tiny", "groklike"])
def test_hf_folder_gives_sentencepiece_ids_and_text(which, tiny_ckpt, groklike, tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from grok_deploy.model.tokenizer import load_tokenizer

    model = tiny_ckpt / "tokenizer.model" if which == "tiny" else groklike
    folder = write_hf_tokenizer(model, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                        "tokenizer_config.json"]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    reference = load_tokenizer(model)  # SentencePiece + the rule: special-token text is the token
    auto = AutoTokenizer.from_pretrained(folder, legacy=False, padding_side="left", trust_remote_code=True)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = corpus()
    special = 0
    for text in texts:
        want = reference.encode(text)
        assert auto.encode(text) == want, text          # add_special_tokens defaults to true: still no BOS
        assert raw.encode(text, add_special_tokens=False).ids == want, text
        shown = [i for i in want if i != 3]  # known difference: SentencePiece decodes [UNK] as " ⁇ "
        assert auto.decode(shown, skip_special_tokens=True) == sp.DecodeIds(shown), text
        if any(p in text for p in ("[PAD]", "[BOS]", "[EOS]", "[UNK]")):
            special += 1
        else:
            assert want == sp.EncodeAsIds(text), text  # no special-token text: SentencePiece's ids
    assert special > 50  # the random strings meet the rule often
    assert reference.encode("Hello [EOS] world[PAD]x") == (sp.EncodeAsIds("Hello ") + [2] + sp.EncodeAsIds(" world")
                                                          + [0] + sp.EncodeAsIds("x"))
    # the backend's tools and its official preprocessing model: end and pad ids from the token texts
    assert auto.encode(auto.eos_token, add_special_tokens=False)[0] == 2
    assert auto.encode(auto.pad_token, add_special_tokens=False)[0] == 0
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id, auto.unk_token_id) == (2, 0, 1, 3)
    assert len(auto) == sp.GetPieceSize()
    # control ids decode to nothing when skipped, to their piece otherwise; generated ids round-trip
    ids = sp.EncodeAsIds("Hello world")
    assert auto.decode(ids + [2], skip_special_tokens=True) == "Hello world"
    assert auto.decode([2] + ids, skip_special_tokens=False).replace(" ", "") == "[EOS]Helloworld"
    assert "The answer" in texts[0] and auto.encode(texts[0]) == sp.EncodeAsIds(texts[0])


def test_spm_reader_matches_sentencepiece(tiny_ckpt):
    import sentencepiece as spm

    m = read_spm_proto((tiny_ckpt / "tokenizer.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))
    assert len(m.pieces) == sp.GetPieceSize()
    assert all(p == sp.IdToPiece(i) and abs(s - sp.GetScore(i)) < 1e-6 for i, (p, s, _) in enumerate(m.pieces))
    kinds = [t for _, _, t in m.pieces]
    assert [i for i, t in enumerate(kinds) if t == CONTROL] == [0, 1, 2]
    assert [m.pieces[i][0] for i, t in enumerate(kinds) if t == USER_DEFINED] == ["<|separator|>", "<|mask|>"]
    assert all(sp.IsByte(i) == (t == BYTE) for i, t in enumerate(kinds))
    assert m.add_dummy_prefix and m.escape_whitespaces


def test_not_a_sentencepiece_model_is_a_user_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        write_hf_tokenizer(bad, tmp_path / "hf")
