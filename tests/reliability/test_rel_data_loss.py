"""Delete only what we wrote (issue 22, items 1 and 2): every data-loss case of the issue, and 15
forged or foreign folder shapes through every command that writes, each refused with one
`error:` line naming the folder and the first unknown entry, exit 2, and the user's files hashed
identical before and after (nothing added beside them either)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_loss_shapes import SHAPES, snapshot
from grok_deploy.cli import main
from grok_deploy.manifest import new_tmp
from rel_helpers import one_error_line

ROOT = Path(__file__).resolve().parents[2]
STAGE_OF = {"convert": "convert", "export-onnx": "export-onnx", "make-tiny": "source", "preprocess": "preprocess",
            "run-source": "source", "run-convert": "convert", "run-export-onnx": "export-onnx", "run-build": "build",
            "run-package": "package", "plan": "source", "verify": "verify", "bench": "bench"}
TARGET = {"verify": "verify", "bench": "bench", "run-build": "onnxruntime"}  # the folder name a command writes


def _main(*args) -> SimpleNamespace:
    import sys
    from io import StringIO

    out, err = StringIO(), StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main([str(a) for a in args])
    finally:
        sys.stdout, sys.stderr = old
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _pipeline(folder: Path, outputs: str = "", name: str = "pipeline.yaml") -> Path:
    """The default pipeline with verify.mode score (verify needs the source stage only)."""
    f = folder / name
    text = (ROOT / "pipeline.yaml").read_text().replace("\nverify:\n", "\nverify:\n  mode: score\n", 1)
    f.write_text(text + (f"\noutputs:\n{outputs}" if outputs else ""))
    return f


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A pipeline folder whose source, export-onnx and build stages are done (package and verify
    can be scheduled against it)."""
    root = tmp_path_factory.mktemp("done")
    res = _main("run", _pipeline(root), "--stages", "source,export-onnx,build")
    assert res.returncode == 0, res.stderr
    return root


def _command(command: str, target: Path, done: Path, ckpt: Path) -> list:
    """The argv that writes `target` (a pipeline file written into `done` where it needs one)."""
    pipe = lambda key, value: _pipeline(done, f"  {key}: {value}\n", f"p-{target.parent.name}.yaml")  # noqa: E731
    return {
        "convert": lambda: ["convert", ckpt, target, "--tp", "2"],
        "export-onnx": lambda: ["export-onnx", ckpt, target],
        "make-tiny": lambda: ["make-tiny", target],
        "preprocess": lambda: ["preprocess", done / "nothing-here", target],
        "run-source": lambda: ["run", pipe("source", target), "--stages", "source"],
        "run-convert": lambda: ["run", pipe("trtllm_ckpt", target), "--stages", "convert"],
        "run-export-onnx": lambda: ["run", pipe("onnx", target), "--stages", "export-onnx"],
        "run-build": lambda: ["run", pipe("engines", target.parent), "--stages", "build"],  # engines/<backend>
        "run-package": lambda: ["run", pipe("triton_repo", target), "--stages", "package"],
        "plan": lambda: ["plan", pipe("source", target)],
        "verify": lambda: ["verify", pipe("reports", target.parent), "--url", "127.0.0.1:9"],
        "bench": lambda: ["bench", pipe("reports", target.parent), "--url", "127.0.0.1:9"],
    }[command]()


@pytest.mark.timeout(600)  # the first one builds the module's pipeline folder
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("command", sorted(STAGE_OF))
def test_forged_and_foreign_folders_are_never_replaced(command, shape, done, tiny_ckpt, tmp_path):
    base = tmp_path / "user"
    base.mkdir()
    target = base / TARGET.get(command, "out")
    entry = SHAPES[shape](target, STAGE_OF[command])
    before = snapshot(tmp_path)
    res = _main(*_command(command, target, done, tiny_ckpt))
    assert res.returncode == 2, (res.stdout, res.stderr)
    line = one_error_line(res.stderr)
    assert f"{target}: " in line, line
    if entry is not None:
        assert f"first unknown entry {entry!r}" in line, line
    elif shape == "inside_another_output":
        assert f"lies inside {target.parent}, an output folder of grok-deploy" in line, line
    else:
        assert "exists and is not a folder (a symlink)" in line, line
    assert snapshot(tmp_path) == before  # the user's files, byte for byte, and nothing added beside them


@pytest.mark.timeout(300)
def test_export_onnx_into_a_forged_mark_a_mark_folder_and_a_foreign_manifest(tiny_ckpt, tmp_path):
    """The issue's first case, by name: thesis.txt and sub/data.csv survive, exit 2."""
    for shape in ("forged_mark", "mark_directory", "foreign_manifest"):
        out = tmp_path / shape / "onnx"
        SHAPES[shape](out, "export-onnx")
        if shape == "mark_directory":
            (out / "thesis.txt").write_text("years of work\n")
        before = snapshot(tmp_path)
        res = _main("export-onnx", tiny_ckpt, out)
        assert res.returncode == 2 and f"{out}: is not empty and was not written by grok-deploy export-onnx" in \
            one_error_line(res.stderr)
        assert snapshot(tmp_path) == before and (out / "thesis.txt").read_text() == "years of work\n"


@pytest.mark.timeout(300)
def test_convert_into_our_output_with_the_users_notes(tiny_ckpt, tmp_path):
    """A copied convert output (and the original) to which the user added NOTES.md and a hostfile."""
    trt = tmp_path / "trt"
    assert _main("convert", tiny_ckpt, trt, "--tp", "2").returncode == 0
    copy = tmp_path / "trt-copy"
    shutil.copytree(trt, copy, symlinks=True)
    for folder in (copy, trt):
        (folder / "NOTES.md").write_text("# runs\n")
        (folder / "hostfile").write_text("node-a slots=8\n")
    before = snapshot(tmp_path)
    for folder in (copy, trt):
        res = _main("convert", tiny_ckpt, folder, "--tp", "2")
        assert res.returncode == 2
        assert f"{folder}: is not empty and was not written by grok-deploy convert: first unknown entry 'NOTES.md'" in \
            one_error_line(res.stderr)
        assert snapshot(tmp_path) == before
    (copy / "NOTES.md").unlink()
    (copy / "hostfile").unlink()
    res = _main("convert", tiny_ckpt, copy, "--tp", "2")  # a pristine copy: its mark names another folder
    assert res.returncode == 2 and "(a copy or a move)" in one_error_line(res.stderr)
    (trt / "NOTES.md").unlink()
    (trt / "hostfile").unlink()
    assert _main("convert", tiny_ckpt, trt, "--tp", "2").returncode == 0  # its own output: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trt", "trt-copy"]


@pytest.mark.timeout(300)
def test_user_folders_named_like_leftovers_survive_run_and_export(tiny_ckpt, tmp_path):
    """<out>.old-backup, <out>.old-v1, <out>.tmp-keep beside a stage output: the sweep goes by our
    mark (and a dead owner), not by name; --force does not widen it."""
    onnx = tmp_path / "onnx"
    pipe = _pipeline(tmp_path)
    source = tmp_path / "export" / "source"
    for out in (onnx, source):
        for suffix in (".old-backup", ".old-v1", ".tmp-keep"):
            SHAPES["user_folder"](out.with_name(out.name + suffix), "x")
        SHAPES["forged_mark"](out.with_name(out.name + ".old-123-456"), "source")  # a forged mark: not ours
    before = snapshot(tmp_path)
    for _ in range(2):
        assert _main("export-onnx", tiny_ckpt, onnx).returncode == 0
        res = _main("run", pipe, "--stages", "source", "--force")
        assert res.returncode == 0, res.stderr
    after = snapshot(tmp_path)
    kept = {k: v for k, v in before.items() if ".old-" in k or ".tmp-" in k}
    assert {k: after.get(k) for k in kept} == kept
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == [
        "onnx.old-123-456", "onnx.old-backup", "onnx.old-v1", "onnx.tmp-keep"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["run-root", "convert-parent"])
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "folder", "user-file"])
def test_the_lock_file_is_never_a_users_file(where, kind, tiny_ckpt, tmp_path):
    """`.grok-deploy.lock` as a symlink to a user file (in the output root; in OUT's parent for
    convert), a hard link, a FIFO, a folder, or a user's file of that name: error, nothing truncated."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work\n")
    work = tmp_path / "work"
    work.mkdir()
    lock = work / ".grok-deploy.lock"
    if kind == "symlink":
        lock.symlink_to(mine / "thesis.txt")
    elif kind == "hardlink":
        os.link(mine / "thesis.txt", lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "folder":
        lock.mkdir()
        (lock / "data.txt").write_text("mine")
    else:
        lock.write_text("my notes, not a lock\n")
    argv = (["run", _pipeline(work), "--stages", "source"] if where == "run-root"
            else ["convert", tiny_ckpt, work / "trt", "--tp", "2"])
    before = snapshot(tmp_path)
    res = _main(*argv)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert f"{lock}: " in line and "not a lock file grok-deploy made; nothing was changed" in line
    assert snapshot(tmp_path) == before


@pytest.mark.timeout(60)
def test_a_lock_replaced_while_held_is_left_alone(tmp_path):
    """The lock replaced by a FIFO during a run: another process gets `error:` (no hang, no
    traceback); the holder's release leaves the FIFO, which is not its file."""
    import subprocess
    import sys

    from grok_deploy.safe_files import LOCK, lock

    with lock(tmp_path, "first"):
        (tmp_path / LOCK).unlink()
        os.mkfifo(tmp_path / LOCK)
        other = subprocess.run([sys.executable, "-c", "import sys\nfrom grok_deploy.safe_files import lock\n"
                                "from grok_deploy.errors import UserError\ntry:\n"
                                f"    with lock({str(tmp_path)!r}): pass\n"
                                "except UserError as e:\n    sys.exit(f'error: {e}')"],
                               capture_output=True, text=True, timeout=30)
        assert other.returncode == 1 and "is a FIFO, not a lock file grok-deploy made" in one_error_line(other.stderr)
    assert (tmp_path / LOCK).is_fifo()


@pytest.mark.timeout(300)
def test_nested_outputs_across_pipelines_are_refused(tmp_path):
    """Pipeline B's output inside pipeline A's stage folder: refused at plan and run; and where a
    user put a folder there anyway, A's --force run refuses to replace its folder."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pipe_a = _pipeline(a)
    assert _main("run", pipe_a, "--stages", "source").returncode == 0
    inside = a / "export" / "source" / "b-onnx"
    pipe_b = _pipeline(b, f"  onnx: {inside}\n  source: {a / 'export' / 'source' / 'b-src'}\n")
    before = snapshot(tmp_path)
    for command in (["plan", pipe_b], ["run", pipe_b, "--stages", "source"]):
        res = _main(*command)
        assert res.returncode == 2
        line = one_error_line(res.stderr)
        assert f"lies inside {a / 'export' / 'source'}, an output folder of grok-deploy source" in line, line
        assert snapshot(tmp_path) == before
    SHAPES["user_folder"](inside, "export-onnx")  # B's checkpoint, put there by hand (or an older release)
    before = snapshot(tmp_path)
    res = _main("run", pipe_a, "--stages", "source", "--force")
    assert res.returncode == 2 and "first unknown entry 'b-onnx'" in one_error_line(res.stderr)
    assert snapshot(tmp_path) == before


@pytest.mark.timeout(600)
def test_logs_and_reports_in_a_users_folder(done, tmp_path):
    """outputs.logs / outputs.reports pointed at a user folder: a same-named user file is never
    overwritten (plan, run, verify refuse naming it); our own logs are replaced on the next run."""
    logs, reports = tmp_path / "mylogs", tmp_path / "myreports"
    logs.mkdir()
    reports.mkdir()
    (logs / "source.log").write_text("my own log\n")
    (reports / "verify.md").write_text("# my verify notes\n")
    pipe = _pipeline(done, f"  logs: {logs}\n  source: {tmp_path / 'src'}\n", "p-logs.yaml")
    before = snapshot(tmp_path)
    for command in (["plan", pipe], ["run", pipe, "--stages", "source"]):
        res = _main(*command)
        assert res.returncode == 2
        assert f"{logs / 'source.log'}: exists and was not written by grok-deploy" in one_error_line(res.stderr)
        assert snapshot(tmp_path) == before
    (logs / "source.log").rename(logs / "mine.log")
    for _ in range(2):  # our own log (registered in .grok-deploy-files) is replaced
        res = _main("run", pipe, "--stages", "source", "--force")
        assert res.returncode == 0, res.stderr
    assert "stage source" in (logs / "source.log").read_text() and (logs / "mine.log").read_text() == "my own log\n"
    pipe = _pipeline(done, f"  reports: {reports}\n", "p-reports.yaml")
    before = snapshot(tmp_path)
    for command in (["plan", pipe], ["verify", pipe, "--url", "127.0.0.1:9"]):
        res = _main(*command)
        assert res.returncode == 2
        assert f"{reports / 'verify.md'}: exists and was not written by grok-deploy" in one_error_line(res.stderr)
        assert snapshot(tmp_path) == before


def test_the_sweep_and_force_never_take_a_live_or_foreign_tmp(tmp_path):
    """A tmp folder this process is writing stays through another writer's sweep."""
    from grok_deploy.manifest import clean_stale

    out = tmp_path / "out"
    live = new_tmp(out, "convert")
    (live / "half.bin").write_bytes(b"x")
    assert clean_stale(out) == [] and (live / "half.bin").is_file()
