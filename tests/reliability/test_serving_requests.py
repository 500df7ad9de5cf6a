"""Reliability of the serving code without a server (issue 13, items 2, 6, 9): non-finite sampling
inputs refused at parse time, one failing sequence never touches the rest of its batch, template
values cannot inject config, server addresses checked before anything starts."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from serving_fixtures import run_sequences

from grok_deploy.errors import UserError
from grok_deploy.model.generate import generate
from grok_deploy.serving.triton_models.params import BadRequest, Params, parse_request

pytestmark = pytest.mark.timeout(120)
V = 64  # vocab of the parse tests (any size works)


def request(**extra) -> dict:
    base = {"input_ids": np.array([[5, 6, 7]], np.int32), "input_lengths": np.array([[3]], np.int32),
            "request_output_len": np.array([[4]], np.int32)}
    return {**base, **{k: np.asarray(v) for k, v in extra.items()}}


NON_FINITE = {  # case: (inputs, what the message names)
    "temperature nan": ({"temperature": np.array([[np.nan]], np.float32)}, "temperature nan"),
    "temperature inf": ({"temperature": np.array([[np.inf]], np.float32)}, "temperature inf"),
    "top_p nan": ({"runtime_top_p": np.array([[np.nan]], np.float32)}, "runtime_top_p nan"),
    "bias nan": ({"embedding_bias": np.where(np.arange(V) == 9, np.nan, 0).astype(np.float32)[None]}, "token 9"),
    "bias -inf": ({"embedding_bias": np.where(np.arange(V) == 3, -np.inf, 0).astype(np.float32)[None]}, "token 3"),
    "bias +inf": ({"embedding_bias": np.full((1, V), np.inf, np.float32)}, f"{V} value"),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_sampling_inputs_are_invalid_arg(case):
    extra, named = NON_FINITE[case]
    with pytest.raises(BadRequest, match="finite") as e:
        parse_request(request(**extra), 64, V, decoupled=True)
    assert e.value.code == "INVALID_ARG" and named in str(e.value)
    # the same request with finite values is accepted (the refusal is about the value only)
    finite = {k: np.nan_to_num(v, nan=0.5, posinf=0.5, neginf=0.5) for k, v in extra.items()}
    assert parse_request(request(**finite), 64, V, decoupled=True)[0].max_new == 4


class ListSink:
    """Collects one sequence's tokens; `poison(seq)` runs once it has 3 tokens (a fault mid-batch)."""

    def __init__(self, poison=None):
        self.ids, self.finals, self.errors, self.poison = [], 0, [], poison

    def cancelled(self):
        return False

    def tokens(self, seq, new, final):
        self.ids += new
        self.finals += final
        if self.poison and len(self.ids) >= 3 and not final:
            self.poison(seq)

    def error(self, seq, message, code):
        self.errors.append((message, code))
        self.finals += 1


def nan_temperature(seq):
    seq.params.temperature = float("nan")


def nan_bias(seq):
    seq.params.embedding_bias = np.full(seq.params.embedding_bias.shape, np.nan, np.float32)


def client_gone(seq):
    raise BrokenPipeError("client went away")


@pytest.fixture(scope="module")
def engine(tiny_model):
    from grok_deploy.model.engine import TorchEngine

    return TorchEngine(tiny_model, max_batch_size=8, max_seq_len=96)


def test_one_failing_sequence_never_touches_the_others(engine, tiny_model):
    """Faults at admission (NaN temperature past the parser, a temperature so small that logits / T
    overflow) and mid-batch, after 3 tokens (temperature or bias turned NaN, the client's sink
    raising): each ends only its own request, with one error; the others get the reference.
    (Before the fix one such fault failed every live sequence of the batch.)"""
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [20], [30, 31], [40, 41, 42], [50, 51], [60]]
    zero_bias = np.zeros(tiny_model.cfg.vocab_size, np.float32)
    # top_p 1 makes them sample: with neither top-k nor top-p the backend decodes greedily
    bad = {1: (Params(prompts[1], 8, temperature=float("nan"), top_p=1.0), None),
           3: (Params(prompts[3], 8, temperature=1e-40, top_p=1.0), None),
           4: (Params(prompts[4], 8, temperature=0.8, top_p=1.0, seed=4), nan_temperature),
           5: (Params(prompts[5], 8, embedding_bias=zero_bias.copy()), nan_bias),
           7: (Params(prompts[7], 8, temperature=0.8, top_p=1.0, seed=7), client_gone)}
    params = [bad[i][0] if i in bad else Params(p, 8) for i, p in enumerate(prompts)]
    sinks = [ListSink(bad[i][1] if i in bad else None) for i in range(len(prompts))]
    sched = run_sequences(engine, params, sinks)
    good = [i for i in range(len(prompts)) if i not in bad]
    want = dict(zip(good, generate(tiny_model, [prompts[i] for i in good], 8).output_ids))  # greedy, batched
    for i, s in enumerate(sinks):
        assert s.finals == 1, (i, s.finals)
        if i in bad:
            assert len(s.errors) == 1 and s.errors[0][1] == "INTERNAL", (i, s.errors)
        else:
            assert not s.errors and s.ids == want[i], i
    assert "sampling failed for this request" in sinks[1].errors[0][0]
    assert all(len(sinks[i].ids) >= 3 for i in (4, 5, 7))  # these failed mid-batch, not at admission
    assert max(sched.batch_sizes) >= 6  # they really shared decode steps with the good ones
    assert not engine.slots.slot  # every sequence, failed or not, left the engine


# --- config.pbtxt values ----------------------------------------------------------------------

def test_template_values_are_escaped_or_refused():
    from grok_deploy.serving.package import parse_config, render

    tpl = 'name: "m"\nmax_batch_size: ${n}\nparameters { key: "engine_dir" value: { string_value: "${dir}" } }\n'
    evil = '/x" } } parameters { key: "engine_kind" value: { string_value: "evil\\'
    config = parse_config(render(tpl, {"n": 8, "dir": evil}))
    assert {k: v.string_value for k, v in config.parameters.items()} == {"engine_dir": evil}
    for value in ("8 dynamic_batching {}", "8}", "", '"8"'):  # unquoted: one bare token only
        with pytest.raises(UserError, match="n = .*single number or word"):
            render(tpl, {"n": value, "dir": "/x"})
    for value in ("/a\nb", "/a\x00b", "/a\x1bb"):
        with pytest.raises(UserError, match="dir = .*control characters"):
            render(tpl, {"n": 8, "dir": value})
    from grok_deploy.serving.package import Fragment

    assert render("x: ${f}", {"f": Fragment('a { b: "c" }')}) == 'x: a { b: "c" }'  # rendered text, verbatim


# --- server addresses --------------------------------------------------------------------------

@pytest.mark.parametrize("address, message", [
    ("127.0.0.1\x00", "control characters"), ("", "not a host address"), ("local host", "spaces"),
    ("::1", "IPv6"), ("[::1]", "IPv6"), ("fe80::1", "IPv6"),
    ("no-such-host.invalid", "cannot be resolved"),
])
def test_bad_server_addresses_are_named_not_port_in_use(address, message, tmp_path):
    from grok_deploy.serving.deploy import TritonServer

    if address:  # TritonServer(address="") means its default, 127.0.0.1 (the schema refuses "")
        (tmp_path / "ensemble").mkdir()
        (tmp_path / "ensemble" / "config.pbtxt").write_text("")
        server = TritonServer(repo=tmp_path, address=address, grpc_port=18001, http_port=18000, metrics_port=18002)
        with pytest.raises(UserError) as e:
            server.start()
        assert message in str(e.value) and "in use" not in str(e.value) and server.proc is None
    from grok_deploy.serving.deploy import bind_address

    with pytest.raises(UserError, match=f"server.address: .*{message}"):
        bind_address(address)


def test_localhost_resolves_and_0000_is_told(tmp_path, capsys):
    import socket

    from grok_deploy.serving.deploy import TritonServer
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / "config.pbtxt").write_text("")
    with socket.socket() as taken:  # a port in use stops the start right after the address checks
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(repo=tmp_path, address="0.0.0.0", grpc_port=port, http_port=0, metrics_port=0)
        with pytest.raises(UserError, match=f"grpc port {port} on 0.0.0.0 is in use"):
            server.start()
    assert "warning: server.address 0.0.0.0: the server listens on every network interface" in capsys.readouterr().err
    assert "every network interface" in server.listening and server.host == "127.0.0.1"
    from grok_deploy.serving.deploy import bind_address

    assert bind_address("localhost") == "127.0.0.1" and bind_address("127.0.0.1") == "127.0.0.1"
    local = TritonServer(repo=tmp_path, address="localhost")
    local.bind = bind_address(local.address)
    assert local.listening == "127.0.0.1 only (this machine)" and local.grpc_url.startswith("127.0.0.1:")


def write(tmp_path, text: str):
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("yaml_text, key, message", [
    ('server:\n  address: "127.0.0.1\\x00"\n', "server.address", "control characters"),
    ('server:\n  address: "::1"\n', "server.address", "IPv6"),
    ('verify:\n  prompts: ["ok", "a\\ud800b"]\n', "verify.prompts.1", "not valid Unicode"),
    ('server:\n  admin_key: "short"\n', "server.admin_key", "5 characters; use 16 to 256 letters"),
    ('server:\n  admin_key: "has,comma:and=equals-0123"\n', "server.admin_key", "letters, digits and . _ ~ -"),
])
def test_plan_refuses_bad_addresses_and_prompts(tmp_path, yaml_text, key, message):
    r = subprocess.run([sys.executable, "-m", "grok_deploy.cli", "plan", str(write(tmp_path, yaml_text))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout[-300:], r.stderr[-300:])
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: pipeline.yaml line ") and key in line and message in line


def test_plan_warns_about_0000(tmp_path):
    r = subprocess.run([sys.executable, "-m", "grok_deploy.cli", "plan",
                        str(write(tmp_path, 'server:\n  address: "0.0.0.0"\n'))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "warning: pipeline.yaml line 2: server.address: 0.0.0.0 makes the server listen on every network " \
           "interface" in r.stdout


def test_query_refuses_text_that_is_not_unicode():
    from grok_deploy.serving.client import query

    with pytest.raises(UserError, match=r"prompt: not valid Unicode text: '\\ud800' at character 1"):
        query("127.0.0.1:1", "a\ud800b", 4)  # refused before any connection
    r = subprocess.run([sys.executable, "-m", "grok_deploy.cli", "query", "--url", "127.0.0.1:1", b"a\xffb"],
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and r.stderr.decode().strip().startswith("error: prompt: not valid Unicode text")


# --- bounded request cost (issue 22.5) ----------------------------------------------------------

def words(lists: list[list[int]]) -> np.ndarray:
    """[1, 2, N]: the backend's flat ids and cumulative end offsets (one batch row)."""
    flat = [t for w in lists for t in w]
    ends = np.cumsum([len(w) for w in lists]).tolist()
    return np.array([[flat, ends + [-1] * (len(flat) - len(ends))]], np.int32)


def test_word_lists_are_bounded_before_they_are_read():
    import time

    from grok_deploy.serving.triton_models.params import MAX_WORD_TOKENS, MAX_WORDS

    million = np.stack([np.full(1_000_000, 9, np.int32), np.arange(1, 1_000_001, dtype=np.int32)])[None]
    t0 = time.monotonic()
    with pytest.raises(BadRequest, match=f"bad_words_list: 1000000 tokens; at most {MAX_WORD_TOKENS} per request row"):
        parse_request(request(bad_words_list=million), 64, V, decoupled=True)
    assert time.monotonic() - t0 < 0.5  # refused from its shape, not after reading a million words
    with pytest.raises(BadRequest, match=f"stop_words_list: {MAX_WORDS + 1} words; at most {MAX_WORDS}"):
        parse_request(request(stop_words_list=words([[3]] * (MAX_WORDS + 1))), 64, V, decoupled=True)
    at_limit = words([[3]] * (MAX_WORDS - 1) + [[4] * (MAX_WORD_TOKENS - MAX_WORDS + 1)])
    p = parse_request(request(bad_words_list=at_limit, stop_words_list=at_limit), 64, V, decoupled=True)[0]
    assert len(p.bad_words) == len(p.stop_words) == MAX_WORDS and len(p.bad_words[-1]) == MAX_WORD_TOKENS - MAX_WORDS + 1
    with pytest.raises(BadRequest, match=r"prompt length \(65 tokens per input_ids row\) exceeds maximum input length \(64\)"):
        parse_request(request(input_ids=np.zeros((1, 65), np.int32)), 64, V, decoupled=True)
    with pytest.raises(BadRequest, match=f"embedding_bias must have {V} values, got {V * 2}"):
        parse_request(request(embedding_bias=np.zeros((1, V * 2), np.float32)), 64, V, decoupled=True)


def test_bad_words_mask_single_and_multi_token_words():
    """One vectorised mask for 1-token words, a suffix test for longer ones: the same tokens as
    masking word by word."""
    import torch

    from grok_deploy.serving.triton_models.params import MASKED, next_token

    logits = np.arange(V, dtype=np.float32)  # argmax = V - 1, then V - 2, ...
    p = Params([1, 2], 4, bad_words=[[V - 1], [7, V - 2], [V - 3]])
    tok, x = next_token(logits, p, [1, 2], 0, torch.Generator())
    assert tok == V - 2 and x[V - 1] == MASKED and x[V - 3] == MASKED and x[V - 2] == V - 2  # 7 not last
    tok, x = next_token(logits, p, [1, 2, 7], 1, torch.Generator())
    assert tok == V - 4 and x[V - 2] == MASKED  # after 7, the 2-token word's last token is banned too
