"""No data loss (issue 13, item 1; item 9's build tmp name): a stage replaces only a folder it
made or an empty one; output folders overlap neither the source, nor the pipeline's folder, nor
each other. Every refusal is one `error:` line, exit 2, and leaves every byte where it was."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from grok_deploy.errors import UserError
from grok_deploy.manifest import MARK, atomic_dir, commit, new_tmp, replace_problem
from grok_deploy.pipeline.runner import run_pipeline
from grok_deploy.pipeline.schema import load_pipeline
from grok_deploy.pipeline.stages import Stage
from grok_deploy.cli import main
from rel_helpers import digest, leftovers, one_error_line

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(capsys):
    """The command in this process (fast); returns an object with returncode and stderr."""
    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run


@pytest.fixture
def src(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint, which a failing test may destroy."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


def _user_folder(path: Path) -> dict:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "config.json").write_text('{"mine": true}')  # convert used to take this for its own
    return digest(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["export-onnx", "convert"])
@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_the_source_is_refused(src, command, where, cli):
    before = digest(src)
    out = {"same": src, "inside": src / "out", "parent": src.parent}[where]
    res = cli(command, src, out, *(["--tp", "2"] if command == "convert" else []))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert ("overlaps the source" in line) if where != "parent" else ("not empty" in line or "overlaps" in line)
    assert digest(src) == before and not (src / "out").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["export-onnx", "convert"])
def test_a_users_folder_is_never_replaced(src, tmp_path, command, cli):
    out = tmp_path / "mine"
    before = _user_folder(out)
    res = cli(command, src, out, *(["--tp", "2"] if command == "convert" else []))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert f"{out}: is not empty and was not written by grok-deploy {command}" in line and "thesis.tex" in line
    assert digest(out) == before and leftovers(tmp_path) == []
    (tmp_path / "afile").write_text("x")  # a file where a folder should go
    res = cli(command, src, tmp_path / "afile", *(["--tp", "2"] if command == "convert" else []))
    assert res.returncode == 2 and "is not a folder" in one_error_line(res.stderr)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.timeout(180)
def test_own_and_empty_folders_are_replaced_other_stages_are_not(src, tmp_path, cli):
    onnx, trt = tmp_path / "onnx", tmp_path / "trt"
    onnx.mkdir()  # empty: fine
    assert cli("export-onnx", src, onnx).returncode == 0
    first = digest(onnx)
    assert cli("export-onnx", src, onnx).returncode == 0  # its own: replaced, same bytes
    assert digest(onnx) == first
    res = cli("convert", src, onnx, "--tp", "2")  # export-onnx's folder is not convert's
    assert res.returncode == 2 and "grok-deploy export-onnx wrote it" in one_error_line(res.stderr)
    assert digest(onnx) == first
    assert cli("convert", src, trt, "--tp", "2").returncode == 0
    assert (trt / MARK).is_file() and leftovers(tmp_path) == []


def test_commit_refuses_and_moves_nothing(tmp_path):
    out = tmp_path / "out"
    before = _user_folder(out)
    tmp = new_tmp(out, "package")
    (tmp / "new.txt").write_text("new")
    with pytest.raises(UserError, match="thesis.tex"):
        commit(tmp, out, {"runner": {"name": "package"}})
    assert digest(out) == before and (tmp / "new.txt").is_file()
    with pytest.raises(UserError):
        with atomic_dir(out, "package") as t:
            (t / "x").write_text("never")
    assert digest(out) == before and leftovers(tmp_path) == [tmp.name]
    link = tmp_path / "link"
    link.symlink_to(out)
    assert "a symlink" in replace_problem(link, "package")
    (out / "thesis.tex").unlink()
    (out / "config.json").unlink()
    (out / "README.md").write_text("kept")  # README.md alone counts as empty, and survives the swap
    assert replace_problem(out, "package") is None
    commit(tmp, out, {"runner": {"name": "package", "fingerprint": "f", "complete": True}})
    assert (out / "README.md").read_text() == "kept" and (out / "new.txt").read_text() == "new"


def _pipe(tmp_path: Path, extra: str) -> Path:
    f = tmp_path / "pipeline.yaml"
    f.write_text((ROOT / "pipeline.yaml").read_text() + "\n" + extra)
    return f


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outputs,message", [
    ("outputs:\n  source: .", "holds the pipeline's own folder"),
    ("outputs:\n  triton_repo: ..", "holds the pipeline's own folder"),
    ("outputs:\n  logs: ''", "is empty"),
    ("outputs:\n  onnx: export/source/onnx", "overlaps outputs.onnx"),
    ("outputs:\n  reports: export", "overlaps"),
])
def test_outputs_overlapping_the_pipeline_folder_or_each_other(tmp_path, outputs, message, cli):
    f = _pipe(tmp_path, outputs)
    (tmp_path / "notes.txt").write_text("mine")
    for command in ("plan", "run"):
        res = cli(command, f)
        assert res.returncode == 2
        line = one_error_line(res.stderr)
        assert line.startswith("error: pipeline.yaml line ") and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "pipeline.yaml"]


@pytest.mark.timeout(120)
def test_outputs_inside_the_source_and_a_foreign_output_folder(src, tmp_path, cli):
    f = _pipe(tmp_path, f"  # \noutputs:\n  onnx: {src}/onnx\n")
    text = f.read_text().replace("format: synthetic", f"format: xai\n    path: {src}")
    f.write_text(text)
    res = cli("plan", f)
    assert res.returncode == 2 and "outputs.onnx" in res.stderr and "overlaps model.source.path" in res.stderr
    etc = tmp_path / "etc"  # outputs.source: /etc, in a folder of our own
    before = _user_folder(etc)
    f = _pipe(tmp_path, f"outputs:\n  source: {etc}\n")
    for command in ("plan", "run"):
        res = cli(command, f)
        assert res.returncode == 2
        assert f"stage source: {etc}: is not empty and was not written by grok-deploy source" in one_error_line(res.stderr)
    assert digest(etc) == before and not (tmp_path / "export").exists()


def test_runner_refuses_before_running_any_stage(tmp_path):
    f = _pipe(tmp_path, "")
    worked = []
    table = [Stage("a", lambda ctx: worked.append("a") or {}, out=lambda c: c.root / "out" / "a"),
             Stage("b", lambda ctx: worked.append("b") or {}, upstream=("a",), out=lambda c: c.root / "out" / "b")]
    before = _user_folder(tmp_path / "out" / "b")
    with pytest.raises(UserError, match="out/b: is not empty and was not written by grok-deploy b"):
        run_pipeline(load_pipeline(f), table=table, echo=lambda s: None)
    assert worked == [] and digest(tmp_path / "out" / "b") == before and not (tmp_path / "out" / "a").exists()


def test_build_tmp_folder_is_per_process_and_the_target_checked_first(tmp_path, monkeypatch):
    import json

    from grok_deploy.trtllm import build

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"quantization": {"quant_algo": "W8A16"}, "mapping": {"world_size": 1},
                                                  "max_position_embeddings": 1024, "dtype": "bfloat16"}))
    (ckpt / "manifest.json").write_text(json.dumps({"preprocessed": False}))
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(UserError) as e:
        build.build_trtllm(ckpt, tmp_path / "engine", {"max_batch_size": 1, "max_seq_len": 512, "max_input_len": 256})
    assert f"engine.tmp-{os.getpid()}-build/checkpoint" in str(e.value)  # not one fixed name for all
    before = _user_folder(tmp_path / "mine")
    with pytest.raises(UserError, match="is not empty and was not written by grok-deploy build"):
        build.build_trtllm(ckpt, tmp_path / "mine", {"max_batch_size": 1, "max_seq_len": 512, "max_input_len": 256})
    assert digest(tmp_path / "mine") == before
