"""`grok-deploy bench` (serving/bench.py): exact synthetic prompts, the sweep against the session
server with figures counted from what streams back, the JSON/MD/PNG report; dead servers are
`error:` lines with exit 2 for bench and query."""
from __future__ import annotations

import json

import pytest
from serving_fixtures import served, write_pipeline  # noqa: F401 (fixture)

from grok_deploy.cli import main
from grok_deploy.serving.bench import bench, synthetic_prompts
from grok_deploy.serving.deploy import free_port


def test_synthetic_prompts_have_exact_token_counts(tiny_tokenizer):
    for n in (1, 7, 64):
        prompts = synthetic_prompts(tiny_tokenizer, n, 5, seed=1)
        assert [len(tiny_tokenizer.encode(p)) for p in prompts] == [n] * 5 and len(set(prompts)) == 5
    assert synthetic_prompts(tiny_tokenizer, 9, 3, seed=2) == synthetic_prompts(tiny_tokenizer, 9, 3, seed=2)


@pytest.mark.server
@pytest.mark.timeout(240)
def test_bench_sweep_report(served, tiny_ckpt, tmp_path):
    from grok_deploy.pipeline.schema import load_pipeline

    cfg = load_pipeline(write_pipeline(tmp_path))
    out = tmp_path / "reports" / "bench"
    doc = bench(cfg, url=served.grpc_url, out=out, concurrency=(1, 3), requests=4, warmup=1, input_tokens=12,
                output_tokens=5, tokenizer=tiny_ckpt / "tokenizer.model")
    assert [r["concurrency"] for r in doc["results"]] == [1, 3]
    for r in doc["results"]:
        assert r["requests"] == 4 and r["output_tokens"] == 4 * 5  # ignore-EOS: exactly max_tokens each
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["seconds"], rel=0.01)
        assert r["requests_per_s"] == pytest.approx(4 / r["seconds"], rel=0.01)
        for key in ("ttft_ms", "itl_ms", "request_latency_ms"):
            s = r[key]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"] and len(r["raw"][key]) == 4
        assert r["ttft_ms"]["p50"] < r["request_latency_ms"]["p50"]
    saved = json.loads((out / "bench.json").read_text())
    assert saved["results"][1]["output_tokens"] == 20 and saved["input_tokens"] == 12
    md = (out / "bench.md").read_text()
    assert md.count("\n| 1 | 4 |") == 1 and md.count("\n| 3 | 4 |") == 1 and "bench.png" in md
    assert (out / "bench.png").stat().st_size > 10_000
    ids = bench(cfg, url=served.grpc_url, concurrency=(2,), requests=2, warmup=0, input_tokens=6, output_tokens=3,
                model="tensorrt_llm", tokenizer=tiny_ckpt / "tokenizer.model")
    assert ids["results"][0]["output_tokens"] == 6 and ids["token_count"] == "streamed token ids"


def test_dead_server_is_an_error_line(tiny_ckpt, tmp_path, capsys):
    url = f"127.0.0.1:{free_port()}"
    pipeline = str(write_pipeline(tmp_path))
    assert main(["bench", pipeline, "--url", url, "--tokenizer", str(tiny_ckpt / "tokenizer.model"),
                 "--concurrency", "1", "--requests", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"cannot reach the server at {url}" in err and "Traceback" not in err
    for stream in ([], ["--stream"]):
        assert main(["query", "Hello", "--url", url, *stream]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"cannot reach the server at {url}" in err
    assert main(["bench", pipeline, "--url", url, "--requests", "0"]) == 2
    assert "requests must be positive" in capsys.readouterr().err
