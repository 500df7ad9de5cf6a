"""onnxruntime-genai opens the export-onnx folder: Model + Tokenizer + Generator give the reference's
greedy tokens (the calls as onnxruntime-genai's own examples make them: Model(folder),
GeneratorParams.set_search_options, Generator.append_tokens, generate_next_token, get_next_tokens)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og
import pytest
from test_fused_graph import verification_prompts

from grok_deploy.model.generate import generate
from grok_deploy.onnx.export import export_onnx


@pytest.fixture(scope="module")
def genai_dir(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("genai") / "onnx"
    export_onnx(tiny_ckpt, out, "none", progress=False)
    return out


def genai_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([prompt_ids])
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def test_genai_config_describes_the_graph(genai_dir):
    conf = json.loads((genai_dir / "genai_config.json").read_text())
    dec = conf["model"]["decoder"]
    assert dec["filename"] == "model.onnx" and dec["num_hidden_layers"] == 12 and dec["head_size"] == 16
    assert (dec["num_attention_heads"], dec["num_key_value_heads"]) == (16, 8)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key" and dec["outputs"]["logits"] == "logits"
    assert conf["search"]["past_present_share_buffer"] is True and conf["search"]["max_length"] == 1024
    assert conf["model"]["eos_token_id"] == 2 and conf["model"]["vocab_size"] == 1024
    man = json.loads((genai_dir / "manifest.json").read_text())
    assert man["onnxruntime_genai"]["files"] == ["genai_config.json", "tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json"]


def test_genai_tokenizer_gives_sentencepiece_ids(genai_dir, tiny_tokenizer):
    """Encoding: SentencePiece's ids on the 10 verification prompts. Decoding: the same text after
    the one leading space genai 0.18 keeps (the dummy prefix; SentencePiece strips it)."""
    tok = og.Tokenizer(og.Model(str(genai_dir)))
    for text in verification_prompts():
        ids = tiny_tokenizer.encode(text)
        assert list(tok.encode(text)) == ids, text
        assert tok.decode(np.array(ids, np.int32)) == " " + tiny_tokenizer.decode(ids), text


def test_genai_generator_gives_the_reference_greedy_tokens(genai_dir, tiny_model, tiny_tokenizer):
    model = og.Model(str(genai_dir))
    prompts = [tiny_tokenizer.encode(p) for p in verification_prompts()]
    ref = generate(tiny_model, prompts, 16)
    got = [genai_greedy(model, p, 16) for p in prompts]
    # the reference stops at EOS; genai's is_done() does too
    assert got == ref.output_ids


def test_the_engine_folder_opens_in_genai_too(genai_dir, tmp_path, tiny_model, tiny_tokenizer):
    """build_engine writes genai_config.json naming the optimised graph, loaded without re-optimising."""
    from grok_deploy.onnx.ort_engine import OPT_MODEL, build_engine

    man = build_engine(genai_dir, tmp_path / "engine", max_batch_size=2, max_seq_len=64, threads=1)
    conf = json.loads((tmp_path / "engine" / "genai_config.json").read_text())
    assert conf["model"]["decoder"]["filename"] == OPT_MODEL and man["onnxruntime_genai"]["config"] == "genai_config.json"
    assert conf["model"]["decoder"]["session_options"]["graph_optimization_level"] == "ORT_DISABLE_ALL"
    prompt = tiny_tokenizer.encode(verification_prompts()[2])
    assert genai_greedy(og.Model(str(tmp_path / "engine")), prompt, 12) == generate(tiny_model, [prompt], 12).output_ids[0]
