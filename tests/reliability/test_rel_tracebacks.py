"""No traceback (issue 22, item 9): each case that printed one is now one `error:` line and exit 2,
run as a real `grok-deploy` process, with nothing half-written left behind. A full file system is
a real tmpfs in a private mount namespace (rel_helpers.cli_on_small_fs): too small to pass the
up-front check, big enough to pass it but not to hold the output (the failure comes mid-write),
or filled to the last block before the command starts."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from grok_deploy.checkpoint.tiny import min_bytes
from grok_deploy.model.config import GrokConfig
from grok_deploy.onnx.export import min_bytes as onnx_min_bytes
from rel_helpers import cli, cli_on_small_fs, leftovers, one_error_line

TINY = GrokConfig.from_name("grok-1-tiny")
LONG = "a" * 6000
PIPELINE = "model:\n  preset: grok-1-tiny\n{model_source}outputs:\n{outputs}verify:\n  check_shards: false\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_ckpt):
    return Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("tracebacks") / "ckpt"))


def _pipeline(folder: Path, model_source: str = "", **outputs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"  {k}: {v}\n" for k, v in outputs.items()) or "  logs: export/logs\n"
    (folder / "pipeline.yaml").write_text(PIPELINE.format(model_source=model_source, outputs=lines))
    return folder / "pipeline.yaml"


def _hf_with_dangling_link(tmp: Path, ckpt: Path) -> Path:
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.hf import write_hf_checkpoint

    src = open_checkpoint(ckpt)
    hf = write_hf_checkpoint(tmp / "hf", src.config, dict(src.params()), dtype="float32")
    shutil.copy(ckpt / "tokenizer.model", hf / "tokenizer.model")
    (hf / "notes.md").symlink_to(tmp / "gone.md")  # leads nowhere
    return hf


# name -> setup(tmp, ckpt) returning (argv, what the error line says, a check of what is left)
def _lock_fifo(tmp, ckpt):
    os.mkfifo(tmp / ".grok-deploy.lock")
    return ["export-onnx", ckpt, tmp / "onnx"], ".grok-deploy.lock", lambda: not (tmp / "onnx").exists()


def _lock_folder(tmp, ckpt):
    (tmp / ".grok-deploy.lock").mkdir()
    return ["export-onnx", ckpt, tmp / "onnx"], ".grok-deploy.lock", lambda: not (tmp / "onnx").exists()


def _lock_fifo_run(tmp, ckpt):
    pipeline = _pipeline(tmp / "p")
    os.mkfifo(tmp / "p" / ".grok-deploy.lock")
    return ["run", pipeline, "--stages", "source"], ".grok-deploy.lock", lambda: not (tmp / "p" / "export").exists()


def _readme_folder(tmp, ckpt):
    (tmp / "onnx" / "README.md").mkdir(parents=True)
    return (["export-onnx", ckpt, tmp / "onnx"], "README.md",
            lambda: sorted(os.listdir(tmp / "onnx")) == ["README.md"] and leftovers(tmp) == [])


def _long_name(command):
    def setup(tmp, ckpt):
        argv = {"inspect": ["inspect", tmp / LONG], "generate": ["generate", tmp / LONG, "--prompt", "hi"],
                "export-onnx": ["export-onnx", ckpt, tmp / LONG], "make-tiny": ["make-tiny", tmp / LONG],
                "convert": ["convert", ckpt, tmp / LONG, "--tp", "2"], "plan": ["plan", tmp / LONG]}[command]
        message = "cannot read the pipeline file (File name too long)" if command == "plan" else "the path is too long"
        return argv, message, lambda: leftovers(tmp) == [] and os.listdir(tmp) == []
    return setup


def _nul_preprocessed(tmp, ckpt):
    (tmp / "pipeline.yaml").write_text('outputs:\n  trtllm_preprocessed: "x\\0y"\n')
    return (["plan", tmp / "pipeline.yaml"], "line 2: outputs.trtllm_preprocessed: contains a NUL character",
            lambda: sorted(os.listdir(tmp)) == ["pipeline.yaml"])


def _dangling(command):
    def setup(tmp, ckpt):
        hf = _hf_with_dangling_link(tmp, ckpt)
        source = f"  source:\n    format: hf\n    path: {hf}\n"
        pipeline = _pipeline(tmp / "p", model_source=source)
        argv = ["plan", pipeline] if command == "plan" else ["run", pipeline, "--stages", "source"]
        return (argv, f"{hf / 'notes.md'}: a symlink in the source folder that leads nowhere",
                lambda: not (tmp / "p" / "export").exists() or os.listdir(tmp / "p" / "export") == ["logs"])
    return setup


def _sparse_tokenizer(tmp, ckpt):
    shutil.copytree(ckpt, tmp / "ckpt")
    os.truncate(tmp / "ckpt" / "tokenizer.model", 8 << 30)
    return (["generate", tmp / "ckpt", "--prompt", "hi"], "8589934592 bytes, larger than any SentencePiece model",
            lambda: sorted(os.listdir(tmp)) == ["ckpt"])


CASES = {
    "lock is a FIFO": _lock_fifo,
    "lock is a folder": _lock_folder,
    "lock is a FIFO (run)": _lock_fifo_run,
    "README.md is a folder": _readme_folder,
    **{f"6000-byte name ({c})": _long_name(c) for c in ("inspect", "generate", "export-onnx", "make-tiny",
                                                         "convert", "plan")},
    "NUL in outputs.trtllm_preprocessed": _nul_preprocessed,
    "dangling symlink in an hf source (plan)": _dangling("plan"),
    "dangling symlink in an hf source (run)": _dangling("run"),
    "8 GB sparse tokenizer.model (generate)": _sparse_tokenizer,
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(CASES))
def test_no_traceback(ckpt, tmp_path, name):
    tmp = tmp_path / "work"
    tmp.mkdir()
    argv, message, clean = CASES[name](tmp, ckpt)
    res = cli(*argv, timeout=180)
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert message in line, line
    assert clean(), sorted(os.listdir(tmp))


# --- a full file system -----------------------------------------------------------------------

def _no_space_line(res, mnt: Path) -> str:
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert f"file system mounted at {mnt}" in line, line
    return line


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["up front", "mid-write", "already full"])
def test_export_onnx_on_a_full_file_system(ckpt, tmp_path, when):
    need = onnx_min_bytes(TINY, "none")
    size, fill = {"up front": ("1m", False), "mid-write": (str(need + (1 << 20)), False),
                  "already full": ("1m", True)}[when]
    mnt = tmp_path / "mnt"
    res, left = cli_on_small_fs(mnt, size, "export-onnx", ckpt, mnt / "onnx", fill=fill)
    line = _no_space_line(res, mnt)
    if when == "up front":
        assert f"needs 0.11 GB ({need} bytes)" in line
    elif when == "mid-write":
        assert "no space left" in line
        assert f"the ONNX export (grok-1-tiny, quant none) needs at least {need} bytes" in line
    else:
        assert "no space left" in line and "the lock file" in line
    assert [p for p in left if p != "./.grok-deploy.lock 0"] == []  # no onnx/, no tmp folder


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["up front", "mid-write"])
def test_make_tiny_on_a_full_file_system(tmp_path, when):
    need = min_bytes(TINY)
    size = "1m" if when == "up front" else str(need + (256 << 10))  # passes the check, not the writing
    mnt = tmp_path / "mnt"
    res, left = cli_on_small_fs(mnt, size, "make-tiny", mnt / "tiny")
    line = _no_space_line(res, mnt)
    assert f"({need} bytes)" in line if when == "up front" else f"needs at least {need} bytes" in line
    assert left == []


@pytest.mark.timeout(400)
@pytest.mark.parametrize("where", ["outputs", "outputs, already full", "logs", "package"])
def test_run_on_a_full_file_system(tmp_path, where):
    mnt = tmp_path / "mnt"
    outputs = {"source": tmp_path / "export/source", "onnx": tmp_path / "export/onnx", "engines": tmp_path / "engines",
               "triton_repo": tmp_path / "triton_repo", "reports": tmp_path / "export/reports",
               "logs": tmp_path / "export/logs"}
    stages, size, fill = "source", "1m", False
    if where.startswith("outputs"):
        outputs["source"] = mnt / "source"
        fill = where.endswith("full")
    elif where == "logs":
        outputs["logs"], fill = mnt / "logs", True
    else:
        outputs["triton_repo"], stages, size = mnt / "repo", "source,export-onnx,build,package", "256k"
    pipeline = _pipeline(tmp_path / "p", **outputs)
    res, left = cli_on_small_fs(mnt, size, "run", pipeline, "--stages", stages, fill=fill, timeout=360)
    line = _no_space_line(res, mnt)
    assert "no space left" in line, line
    expect = {"outputs": (f"{mnt / 'source'}:", "stage source needs more than"),
              "outputs, already full": ("the lock file",),
              "logs": (f"{mnt / 'logs' / 'source.log'}:", "stage log needs "),
              "package": (f"{mnt / 'repo'}", "the model repository needs more than")}[where]
    assert all(s in line for s in expect), line
    if where == "logs":  # the log could not hold its first line: an empty file, nothing else
        assert left == ["./logs/", "./logs/source.log 0"], left
    else:
        assert [p for p in left if p != "./.grok-deploy.lock 0"] == [], left
    assert leftovers(tmp_path / "export") == []
