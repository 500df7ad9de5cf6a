"""pipeline.yaml as an adversary writes it (issue 13, item 6, config files and paths): every
case ends with exit 0 or exit 2 and one `error:` line, never a traceback, a hang or a memory
blow-up; plus a hypothesis fuzz of >= 200 generated files through `plan`, in this process, each
under a per-case alarm, and a few through a real `grok-deploy plan` process."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grok_deploy.cli import main
from rel_helpers import cli, one_error_line

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def plan_in_process(path: Path, seconds: float = 10) -> tuple[int, str, str]:
    """`grok-deploy plan PATH` in this process under an alarm; (exit code, stdout, stderr)."""
    def expired(*_):
        raise TimeoutError(f"plan {path} ran over {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["plan", str(path)])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


def assert_clean_outcome(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    if code == 2:
        one_error_line(err)
    else:
        assert "error:" not in err, err


CASES = {  # name -> bytes of the file; the error must say this
    "non-utf8": (b"model:\n  preset: \xff\xfe\n", "line 2: not UTF-8 text"),
    "nul": (b"model:\n  preset: a\x00b\n", "U+0000 is not allowed"),
    "control": (b"model:\n  preset: \"\x07\"\n", "U+0007 is not allowed"),
    "deep": (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    "deep-map": (("a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 400))).encode(), "line"),
    "5000 digits": (b"engine:\n  max_batch_size: " + b"9" * 5000 + b"\n", "an integer of 5000 digits"),
    "inf": (b"hardware:\n  gpu_memory_gb: .inf\n", "finite number"),
    "nan": (b"verify:\n  tolerances:\n    logit_tol: .nan\n", "finite number"),
    "huge float": (b"hardware:\n  headroom_gb: 1.0e+300\n", "less than or equal to"),
    "huge int": (b"engine:\n  max_batch_size: 100000000000000000000\n", "less than or equal to"),
    "huge tp": (b"parallel:\n  tp: 4294967296\n", "less than or equal to"),
    "billion laughs": (LAUGHS.encode(), "anchors and aliases"),
    "list doc": (b"- 1\n- 2\n", "must be a mapping"),
    "int key": (b"1: 2\n", "section names"),
    "complex key": (b"? [a, b]\n: 1\n", "keys must be plain names"),
    "dup key": (b"model: {}\nmodel: {}\n", "duplicate key"),
    "tab": (b"model:\n\tpreset: x\n", "YAML syntax"),
    "python tag": (b"model: !!python/object/apply:os.system [echo hi]\n", "YAML syntax"),
    "nul path": (b"model:\n  source:\n    format: xai\n    path: \"a\\0b\"\n", "contains a NUL character"),
    "nul output": (b"outputs:\n  onnx: \"x\\0\"\n", "contains a NUL character"),
    "long path": (b"outputs:\n  onnx: " + b"a" * 300 + b"\n", "too long for a path"),
    "empty prompt list": (b"verify:\n  prompts: []\n", "verify.prompts"),
    "seed": (b"model:\n  source:\n    seed: -1\n", "model.source.seed"),
    "huge string": (b"model:\n  preset: " + b"x" * 900_000 + b"\n", "unknown preset"),
    "too big": (b"# " + b"x" * (2 << 20) + b"\n", "more than the 1048576 allowed"),
}


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_pipeline_files(tmp_path, name):
    data, message = CASES[name]
    f = tmp_path / "pipeline.yaml"
    f.write_bytes(data)
    code, out, err = plan_in_process(f)
    assert code == 2, (name, out[:300], err)
    line = one_error_line(err)
    assert message in line and len(line) < 1000, line


@pytest.mark.timeout(120)
def test_special_files_and_paths_in_a_real_process(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "laughs.yaml").write_text(LAUGHS)
    for path, message in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                          (tmp_path / "dangling.yaml", "No such file"), (tmp_path / "loop1", "ymlink loop"),
                          (tmp_path, "is a folder"), (tmp_path / "laughs.yaml", "anchors and aliases")):
        res = cli("plan", path, timeout=60)  # a hang or an OOM here fails by the timeout
        assert res.returncode == 2, (path, res.stderr)
        assert message in one_error_line(res.stderr), res.stderr


def test_nul_in_the_pipeline_path(capsys):
    assert main(["plan", "pipe\x00line.yaml"]) == 2
    assert "contains a NUL character" in one_error_line(capsys.readouterr().err)


# --- the property fuzz ----------------------------------------------------------------------

KEYS = [(s, k) for s, v in BASE.items() if isinstance(v, dict) for k in v] + [
    ("model", "source"), ("verify", "tolerances"), ("engine", "max_seq_len"), ("hardware", "gpu_memory_gb"),
    ("hardware", "headroom_gb"), ("outputs", "source"), ("outputs", "onnx"), ("outputs", "logs"),
    ("server", "binary"), ("triton", "kv_cache_free_gpu_mem_fraction"), ("parallel", "moe_ep")]
TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Cc")), max_size=20)
NASTY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # controls, NUL, astral
PATHS = st.sampled_from([".", "..", "/", "", "export", "export/source", "/etc", "~", "a/../..", "pipeline.yaml",
                         "/dev/null", "x" * 300, "é/ü", " ", "export/onnx/sub", "out/a", "out/b"])
PLAUSIBLE = st.one_of(  # values a user might mean: many of these files are valid (exit 0)
    st.integers(1, 8), st.sampled_from([16, 64, 128, 256, 512, 1024, 2048]), st.floats(0.01, 100), st.booleans(),
    st.sampled_from(["grok-1", "grok-1-tiny", "synthetic", "trtllm", "onnxruntime", "int8", "none", "V1",
                     "auto", "disable", "bfloat16", "float16", "w8a16", "127.0.0.1"]), TEXT)
SCALARS = st.one_of(
    st.integers(), st.integers(-(10 ** 40), 10 ** 40), st.floats(allow_nan=True, allow_infinity=True),
    st.none(), NASTY_TEXT, PATHS,
    st.sampled_from(["0x10", "1e9", ".inf", "yes", "~", "-1", "1_000", "0o17", "2001-01-01"]))
VALUES = st.recursive(st.one_of(PLAUSIBLE, SCALARS), lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)


@st.composite
def pipeline_texts(draw) -> bytes:
    """A pipeline.yaml: the default one with 1-4 keys changed (known keys, or new ones) to values
    of any type, sometimes with raw bytes spliced into the dumped text."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for _ in range(draw(st.integers(1, 4))):
        section, key = draw(st.sampled_from(KEYS)) if draw(st.integers(0, 3)) < 3 else draw(st.tuples(TEXT, TEXT))
        kind = draw(st.integers(0, 9))
        value = draw(PLAUSIBLE) if kind < 5 else draw(VALUES)
        if kind < 8 and isinstance(doc.get(section), dict):
            doc[section][key] = value
        else:
            doc[section] = value if kind == 9 else {key: value}
    text = yaml.safe_dump(doc, allow_unicode=True).encode()
    if draw(st.integers(0, 9)) == 9:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=6)) + text[at:]
    return text


@pytest.mark.timeout(300, method="thread")
@settings(max_examples=220, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(pipeline_texts())
def test_fuzz_plan_in_process(text):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "pipeline.yaml"
        f.write_bytes(text)
        code, _, err = plan_in_process(f)
        assert_clean_outcome(code, err)
        assert sorted(p.name for p in Path(d).iterdir()) == ["pipeline.yaml"]  # plan writes nothing


@pytest.mark.timeout(300)
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(pipeline_texts())
def test_fuzz_plan_in_a_real_process(text):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "pipeline.yaml"
        f.write_bytes(text)
        res = cli("plan", f, timeout=60)
        assert_clean_outcome(res.returncode, res.stderr)
