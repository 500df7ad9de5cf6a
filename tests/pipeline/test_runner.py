"""The stage runner on a table of small real stages that write real files: caching, re-runs of
exactly the changed stage and its downstream, SIGKILL mid-write, failures, logs, summary."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from grok_deploy.cli import main
from grok_deploy.errors import UserError
from grok_deploy.manifest import atomic_dir, commit, mark, new_tmp, read_manifest
from grok_deploy.pipeline.runner import run_pipeline, schedule
from grok_deploy.pipeline.schema import load_pipeline
from grok_deploy.pipeline.stages import Stage
from grok_deploy.progress import Progress, track

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent


def _work(ctx, name: str) -> None:
    with open(ctx.cfg.root / "work.log", "a") as f:
        f.write(name + "\n")
    logging.getLogger("toy").info("toy stage %s working", name)


def _text(ctx, name: str, own: str) -> dict:
    """Write out.txt = upstream's out.txt + this stage's own part; record the work."""
    _work(ctx, name)
    prev = "".join((d / "out.txt").read_text() + " | " for d in ctx.dirs.values() if (d / "out.txt").exists())
    (ctx.out / "out.txt").write_text(prev + own)
    return {"own": own}


def _slow(ctx) -> dict:
    """Writes half its output, says so, then hangs: the test SIGKILLs it here."""
    with open(ctx.out / "out.txt", "w") as f:
        f.write("partial " * 100_000)
        f.flush()
        os.fsync(f.fileno())
        (ctx.cfg.root / "a.started").write_text(str(ctx.out))
        time.sleep(120)
    return {}


def _serve(ctx) -> dict:
    _work(ctx, "serve")

    @contextmanager
    def server():
        yield "srv"
        _work(ctx, "serve-stopped")

    ctx.services.update(server=ctx.stack.enter_context(server()), url="127.0.0.1:1")
    return {"url": "127.0.0.1:1"}


def _check(ctx) -> dict:
    _work(ctx, "check")
    assert ctx.services["url"] == "127.0.0.1:1"
    passed = ctx.cfg.verify.tolerances.logit_tol <= 0.01
    (ctx.out / "report.json").write_text(json.dumps({"passed": passed}))
    return {"passed": passed}


def _broken(ctx) -> dict:
    (ctx.out / "junk.bin").write_bytes(b"x" * 1000)
    raise UserError("toy: the input is corrupt")


def toy_table(slow_a: bool = False, broken_b: bool = False) -> list[Stage]:
    out = lambda name: (lambda c: c.root / "out" / name)  # noqa: E731
    return [
        Stage("a", _slow if slow_a else (lambda ctx: _text(ctx, "a", f"seed={ctx.cfg.model.source.seed}")),
              keys=("model.source.seed",), out=out("a")),
        Stage("b", _broken if broken_b else (lambda ctx: _text(ctx, "b", f"tp={ctx.cfg.parallel.tp}")),
              keys=("parallel.tp",), upstream=("a",), out=out("b")),
        Stage("c", lambda ctx: _text(ctx, "c", f"max_tokens={ctx.cfg.verify.max_tokens}"),
              keys=("verify.max_tokens",), upstream=("b",), out=out("c")),
        Stage("serve", _serve, keys=("server",), upstream=("c",), cached=False),
        Stage("check", _check, keys=("verify.tolerances",), upstream=("serve",), out=out("check")),
        Stage("extra", lambda ctx: _text(ctx, "extra", "x"), upstream=("serve",), out=out("extra"), optional=True),
    ]


@pytest.fixture
def pipe(tmp_path):
    f = tmp_path / "pipeline.yaml"
    f.write_text((ROOT / "pipeline.yaml").read_text())
    return f


def edit(f: Path, old: str, new: str) -> None:
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new, 1))


def work(f: Path) -> list[str]:
    log = f.parent / "work.log"
    names = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return names


def run(f: Path, **kw) -> tuple[int, dict, list[str]]:
    lines: list[str] = []
    code, rows = run_pipeline(load_pipeline(f), table=kw.pop("table", None) or toy_table(), echo=lines.append, **kw)
    return code, {r["stage"]: r["status"] for r in rows}, lines


def test_second_run_does_no_stage_work(pipe):
    code, status, lines = run(pipe)
    assert code == 0 and work(pipe) == ["a", "b", "c", "serve", "check", "serve-stopped"]
    assert status == {"a": "done", "b": "done", "c": "done", "serve": "done", "check": "done", "extra": "not selected"}
    out = pipe.parent / "out"
    assert (out / "c" / "out.txt").read_text() == "seed=0 | tp=2 | max_tokens=16"
    manifests = {n: read_manifest(out / n) for n in "abc"}
    assert manifests["b"]["own"] == "tp=2" and manifests["b"]["runner"]["inputs"] == {"parallel.tp": 2}
    assert manifests["c"]["runner"]["upstream"] == {"b": manifests["b"]["runner"]["fingerprint"]}
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    code, status, lines = run(pipe)
    assert code == 0 and work(pipe) == []
    assert status == {"a": "skipped", "b": "skipped", "c": "skipped", "serve": "not needed", "check": "skipped",
                      "extra": "not selected"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert lines[0].split()[:3] == ["stage", "status", "seconds"]


def test_changing_one_key_reruns_that_stage_and_downstream(pipe):
    run(pipe)
    work(pipe)
    edit(pipe, "max_tokens: 16", "max_tokens: 8")
    code, status, _ = run(pipe)
    assert work(pipe) == ["c", "serve", "check", "serve-stopped"]
    assert [s for s, v in status.items() if v == "skipped"] == ["a", "b"]
    assert (pipe.parent / "out/c/out.txt").read_text() == "seed=0 | tp=2 | max_tokens=8"

    edit(pipe, "  tp: 2\n  pp: 1\n  moe_tp: 2", "  tp: 1\n  pp: 1\n  moe_tp: 1")
    run(pipe)
    assert work(pipe) == ["b", "c", "serve", "check", "serve-stopped"]
    assert (pipe.parent / "out/c/out.txt").read_text() == "seed=0 | tp=1 | max_tokens=8"
    assert read_manifest(pipe.parent / "out/a")["own"] == "seed=0"

    edit(pipe, "    seed: 0", "    seed: 3")
    run(pipe)
    assert work(pipe) == ["a", "b", "c", "serve", "check", "serve-stopped"]
    assert (pipe.parent / "out/c/out.txt").read_text() == "seed=3 | tp=1 | max_tokens=8"


def test_force_and_stages(pipe):
    run(pipe)
    work(pipe)
    run(pipe, force=True)
    assert work(pipe) == ["a", "b", "c", "serve", "check", "serve-stopped"]
    _, status, _ = run(pipe, only=["b"], force=True)
    assert work(pipe) == ["b"] and status["a"] == "not selected" and status["check"] == "not selected"
    _, status, _ = run(pipe, only=["check"], force=True)  # the uncached server starts because check needs it
    assert work(pipe) == ["serve", "check", "serve-stopped"]
    _, status, _ = run(pipe, only=["extra"])
    assert work(pipe) == ["serve", "extra", "serve-stopped"]
    assert (pipe.parent / "out/extra/out.txt").read_text() == "x"
    edit(pipe, "max_tokens: 16", "max_tokens: 9")
    with pytest.raises(UserError, match="stage serve needs c, which is not done for this configuration"):
        run(pipe, only=["check"])
    assert work(pipe) == []
    with pytest.raises(UserError, match="unknown stage 'nope'; stages: a, b, c, serve, check, extra"):
        run(pipe, only=["nope"])


@pytest.mark.timeout(120)
def test_sigkill_mid_write_leaves_no_manifest_and_next_run_redoes_it(pipe):
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_runner as t\n"
              "from grok_deploy.pipeline.schema import load_pipeline\nfrom grok_deploy.pipeline.runner import run_pipeline\n"
              "run_pipeline(load_pipeline(sys.argv[2]), table=t.toy_table(slow_a=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(TESTS), str(pipe)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = pipe.parent / "a.started"
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "stage a never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    tmp = Path(marker.read_text())
    assert tmp.name.startswith("a.tmp-") and (tmp / "out.txt").stat().st_size > 0  # half-written, left behind
    out = pipe.parent / "out" / "a"
    assert not (out / "manifest.json").exists() and read_manifest(out) is None
    assert schedule(load_pipeline(pipe), table=toy_table())[0][0].action == "run"

    code, status, _ = run(pipe)
    assert code == 0 and status["a"] == "done" and work(pipe)[0] == "a"
    assert (out / "out.txt").read_text() == "seed=0" and read_manifest(out) is not None
    assert not tmp.exists() and not list(out.parent.glob("a.tmp-*"))


def test_failing_stage_leaves_no_output_and_no_manifest(pipe):
    run(pipe)
    work(pipe)
    edit(pipe, "  tp: 2\n  pp: 1\n  moe_tp: 2", "  tp: 1\n  pp: 1\n  moe_tp: 1")
    lines: list[str] = []
    with pytest.raises(UserError, match="toy: the input is corrupt"):
        run_pipeline(load_pipeline(pipe), table=toy_table(broken_b=True), echo=lines.append)
    assert "b             error" in lines[0]
    b = pipe.parent / "out" / "b"
    assert read_manifest(b)["runner"]["inputs"] == {"parallel.tp": 2}  # the previous, valid result stays
    assert not list(b.parent.glob("b.tmp-*"))
    assert "toy: the input is corrupt" in (pipe.parent / "export/logs/b.log").read_text()
    code, status, _ = run(pipe)
    assert code == 0 and status["b"] == "done" and work(pipe)[:3] == ["b", "c", "serve"]


def test_failed_check_keeps_report_without_manifest_and_exit_1(pipe):
    edit(pipe, "verify:\n", "verify:\n  tolerances:\n    logit_tol: 0.5\n")
    code, status, lines = run(pipe)
    assert code == 1 and status["check"] == "FAILED"
    check = pipe.parent / "out" / "check"
    assert json.loads((check / "report.json").read_text()) == {"passed": False}
    assert not (check / "manifest.json").exists()
    work(pipe)
    code, status, _ = run(pipe)
    assert code == 1 and work(pipe) == ["serve", "check", "serve-stopped"]  # not done: redone


def test_stage_logs_and_summary(pipe):
    code, _, lines = run(pipe)
    logs = pipe.parent / "export" / "logs"
    assert "toy stage b working" in (logs / "b.log").read_text()
    assert "toy stage b" not in (logs / "c.log").read_text()
    table = lines[0].splitlines()
    row = next(r for r in table if r.startswith("c "))
    assert row.split()[1] == "done" and float(row.split()[2]) >= 0 and str(pipe.parent / "out" / "c") in row
    size = sum(p.stat().st_size for p in (pipe.parent / "out" / "c").iterdir())
    assert " ".join(row.split()[3:5]) == (f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB")


def test_cli_run_errors(pipe, capsys):
    assert main(["run", str(pipe), "--stages", "source,nope"]) == 2
    assert capsys.readouterr().err.startswith("error: --stages: unknown stage 'nope'; stages: source, reference")


def test_commit_keeps_readme_merges_core_manifest_and_manifest_last(tmp_path):
    out = tmp_path / "triton_repo"
    out.mkdir()
    (out / "README.md").write_text("committed")
    (out / "old.txt").write_text("old")
    tmp = new_tmp(out)
    with pytest.raises(UserError, match="old.txt"):  # a folder we did not write is never replaced
        commit(tmp, out)
    assert (out / "old.txt").read_text() == "old" and tmp.is_dir()
    mark(out, "package")  # a mark that lists nothing does not make old.txt ours (issue 22)
    with pytest.raises(UserError, match="first unknown entry 'old.txt'"):
        commit(tmp, out)
    (out / "old.txt").unlink()
    with pytest.raises(UserError, match="first unknown entry '.grok-deploy'"):  # a mark alone neither
        commit(tmp, out)
    (out / ".grok-deploy").unlink()  # the user empties it: README.md alone counts as empty, and is kept
    (tmp / "model.txt").write_text("new")
    (tmp / "manifest.json").write_text(json.dumps({"preprocessed": False, "stage": "convert"}))  # the core's own
    commit(tmp, out, {"runner": {"name": "package", "fingerprint": "f", "complete": True}})
    assert sorted(p.name for p in out.iterdir()) == [".grok-deploy", "README.md", "manifest.json", "model.txt"]
    assert read_manifest(out) == {"preprocessed": False, "stage": "convert", "runner": {"name": "package", "fingerprint": "f", "complete": True}}
    assert not list(tmp_path.glob("triton_repo.*"))
    (out / "manifest.json").write_text('{"runner": {"name": "package", "fingerprint": "f"')  # torn write
    assert read_manifest(out) is None
    (out / "manifest.json").write_text(json.dumps({"preprocessed": False}))  # a core's, not a stage's
    assert read_manifest(out) is None
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "x") as t:
            (t / "a").write_text("a")
            raise RuntimeError
    assert not list(tmp_path.glob("x*"))
    with atomic_dir(tmp_path / "x") as t:
        (t / "manifest.json").write_text("{}")
        (t / "a").write_text("a")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [".grok-deploy", "a"]  # an empty manifest is not written


def test_progress_counts_bytes_and_tensors():
    with Progress(300, "test", total_items=3, show=False) as bar:
        for n in (100, 100, 100):
            bar.update(n, name="t")
    assert (bar.n_bytes, bar.items) == (300, 3)
    assert list(track([b"ab", b"cde"], "t", size=len, show=False)) == [b"ab", b"cde"]


def test_real_table_schedule_on_the_default_pipeline(pipe):
    decisions, problems = schedule(load_pipeline(pipe))
    assert problems == []
    assert [(d.stage.name, d.action) for d in decisions] == [
        ("source", "run"), ("reference", "run"), ("convert", "run"), ("check-shards", "run"),
        ("export-onnx", "run"), ("build", "run"), ("package", "run"), ("deploy", "run"), ("verify", "run"),
        ("bench", "not selected")]
    assert decisions[5].out == pipe.parent / "engines" / "onnxruntime"
    assert {d.stage.name for d in decisions if d.stage.upstream_for(load_pipeline(pipe)) == ("export-onnx",)} == {"build"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_source_and_reference_stages(pipe):
    if not hasattr(pytest.importorskip("grok_deploy.checkpoint"), "open_checkpoint"):
        pytest.skip("grok_deploy.checkpoint.open_checkpoint is not there yet")
    edit(pipe, "  max_tokens: 16", "  max_tokens: 4")
    cfg = load_pipeline(pipe)
    code, rows = run_pipeline(cfg, only=["source", "reference"], echo=lambda s: None)
    assert code == 0 and [r["status"] for r in rows[:2]] == ["done", "done"]
    src = read_manifest(pipe.parent / "export" / "source")
    assert src["format"] == "xai" and src["preset"] == "grok-1-tiny" and src["tensors"] == 146
    assert (pipe.parent / "export/source/ckpt-0/tensor00000_000").exists()
    golden = json.loads((pipe.parent / "export/reference/golden.json").read_text())
    assert len(golden["prompts"]) == len(cfg.verify.prompts) and len(golden["prompts"][0]["output_ids"]) == 4
    code, rows = run_pipeline(cfg, only=["source", "reference"], echo=lambda s: None)
    assert [r["status"] for r in rows[:2]] == ["skipped", "skipped"]
