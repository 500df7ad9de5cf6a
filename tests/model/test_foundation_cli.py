"""make-tiny, inspect and generate through the real CLI on the tiny checkpoint."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from grok_deploy.cli import main
from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig

TEST_PROMPT = "The answer to life the universe and everything is of course"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grok_deploy.cli", *args], capture_output=True, text=True, timeout=300)


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".grok-deploy"}  # the mark names its writer


@pytest.mark.timeout(300)
def test_make_tiny_is_deterministic(tmp_path, tiny_ckpt):
    assert main(["make-tiny", str(tmp_path / "again"), "--seed", "0"]) == 0
    again = digest(tmp_path / "again")
    assert again == digest(tiny_ckpt)
    assert len([k for k in again if k.startswith("ckpt-0/tensor")]) == len(names.flatten_order(12)) == 146
    assert main(["make-tiny", str(tmp_path / "other"), "--seed", "1"]) == 0
    assert digest(tmp_path / "other") != again


def test_make_tiny_refuses_non_empty_folder(tiny_ckpt, capsys):
    assert main(["make-tiny", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tiny_ckpt) in err and len(err.strip().splitlines()) == 1


def test_tokenizer_has_grok_special_ids_and_byte_fallback(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == 1024
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    ids = tok.encode(TEST_PROMPT)
    assert ids[0] not in (1, 2) and 2 not in ids  # no BOS, no EOS
    text = "naïve 🙂 café"
    assert tok.decode(tok.encode(text)) == text
    assert any(tok.id_to_piece(i).startswith("<0x") for i in tok.encode("🦙"))  # byte fallback


def test_inspect_json_lists_every_tensor(tiny_ckpt, capsys):
    assert main(["inspect", str(tiny_ckpt), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cfg = GrokConfig.from_name("grok-1-tiny")
    assert doc["format"] == "xai" and doc["config"]["name"] == "grok-1-tiny"
    assert [t["name"] for t in doc["tensors"]] == names.flatten_order(12)
    by_name = {t["name"]: t for t in doc["tensors"]}
    w1 = by_name[names.layer_path(10, "moe/linear_1/w")]
    assert w1["shape"] == [8, cfg.ffn_size, cfg.emb_size] and w1["quantized"] and w1["dtype"] == "int8"
    assert w1["file"].endswith("tensor00027_000")  # layer 10 sorts right after layer 1 (file 26 + 1)
    assert by_name[names.EMBEDDING]["dtype"] == "float32" and not by_name[names.EMBEDDING]["quantized"]


@pytest.mark.timeout(300)
def test_generate_json_logits_one_row_per_token(tiny_ckpt):
    r = cli("generate", str(tiny_ckpt), "--prompt", TEST_PROMPT, "--max-tokens", "5", "--json", "--logits")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["output_ids"]) == 5 and isinstance(doc["text"], str)
    logits = np.array(doc["logits"])
    assert logits.shape == (5, 1024)
    assert doc["output_ids"] == logits.argmax(-1).tolist()  # greedy: each row chose its token


def test_generate_matches_in_process_reference(tiny_ckpt, tiny_model, tiny_tokenizer, capsys):
    from grok_deploy.model.generate import generate

    assert main(["generate", str(tiny_ckpt), "--prompt", TEST_PROMPT, "--max-tokens", "6", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ids = tiny_tokenizer.encode(TEST_PROMPT)
    assert doc["prompt_ids"] == ids
    assert doc["output_ids"] == generate(tiny_model, [ids], 6).output_ids[0]


def test_generate_sampling_is_seeded(tiny_ckpt, capsys):
    def run(seed):
        assert main(["generate", str(tiny_ckpt), "--prompt", "hello", "--max-tokens", "8",
                     "--temperature", "1.0", "--top-p", "0.9", "--seed", str(seed), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["output_ids"]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_tiny_weights_route_to_every_expert_and_stay_sane(tiny_model, tiny_tokenizer):
    from grok_deploy.model.grok import rms_norm, router_top2

    ids = torch.tensor([tiny_tokenizer.encode(TEST_PROMPT + " and the rest of the world is a big place for the people")])
    layer = tiny_model.layers[0]
    h = tiny_model.embed(ids)
    _, idx = router_top2(rms_norm(h, layer.norm2, 1e-5)[0], layer.router, 2)
    assert set(idx.flatten().tolist()) == set(range(8)), "every expert is chosen by some token"
    logits = tiny_model(ids)[0]
    assert torch.isfinite(logits).all() and 0.5 < logits.std() < 50
    top2 = logits.topk(2, -1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.05  # greedy choices are not near-ties


def test_generate_bad_inputs_give_one_line_errors(tmp_path):
    r = cli("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope" in r.stderr
    assert "Traceback" not in r.stderr


def test_tiny_generations_are_not_degenerate(tiny_model, tiny_tokenizer):
    from grok_deploy.model.generate import generate

    res = generate(tiny_model, [tiny_tokenizer.encode(TEST_PROMPT)], 16)
    assert len(set(res.output_ids[0])) >= 4, "greedy output must not repeat one token"
