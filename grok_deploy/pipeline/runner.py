"""The pipeline runner: sequences the stages of `stages.STAGES`, skipping those already done.

A stage's fingerprint hashes its config keys, its upstream stages' fingerprints and the package
version; a stage whose folder holds a complete manifest with that fingerprint is skipped. A stage
that runs writes into a temporary folder that is renamed into place, manifest.json last.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from grok_deploy import __version__
from grok_deploy.errors import UserError, is_no_space, no_space, space_errors
from grok_deploy.manifest import (check_replaceable, clean_stale, commit, fingerprint, folder_bytes, new_tmp,
                                  read_manifest, replace_problem)
from grok_deploy.pipeline.schema import PipelineConfig, load_pipeline
from grok_deploy.safe_files import lock, open_generated, replace_file_problem
from grok_deploy.pipeline.stages import STAGES, Stage, StageContext

log = logging.getLogger("grok_deploy.pipeline.runner")


@dataclass
class Decision:
    stage: Stage
    action: str            # run | skip (cached) | n/a | not selected | not needed
    reason: str
    fingerprint: str | None
    out: Path | None
    manifest: dict | None  # the complete manifest whose fingerprint matches (the stage is done)


def stage_fingerprint(cfg: PipelineConfig, st: Stage, upstream: dict[str, str | None]) -> str:
    return fingerprint({"stage": st.name, "version": __version__,
                        "inputs": {k: cfg.get(k) for k in st.keys_for(cfg)},
                        "upstream": upstream, "extra": st.extra(cfg) if st.extra else None})


def schedule(cfg: PipelineConfig, only: list[str] | None = None, force: bool = False,
             keep_serving: bool = False, table: list[Stage] | None = None) -> tuple[list[Decision], list[str]]:
    """What a run would do, stage by stage, and the problems that would stop it (as messages)."""
    table = STAGES if table is None else table
    names = [s.name for s in table]
    for n in only or []:
        if n not in names:
            raise UserError(f"--stages: unknown stage {n!r}; stages: {', '.join(names)}")
    fps: dict[str, str | None] = {}
    out: list[Decision] = []
    for st in table:
        if not st.applies(cfg):
            fps[st.name] = None
            out.append(Decision(st, "n/a", "not applicable to this pipeline", None, None, None))
            continue
        ups = [u for u in st.upstream_for(cfg) if fps.get(u)]
        fp = fps[st.name] = stage_fingerprint(cfg, st, {u: fps[u] for u in ups})
        folder = st.out(cfg) if st.out else None
        m = read_manifest(folder) if st.cached and folder else None
        done = m is not None and m["runner"]["fingerprint"] == fp
        selected = st.name in only if only else not st.optional
        if not st.cached:
            action, why = "not needed", "not cached; starts when a later stage needs it"
            if selected and (only or keep_serving):
                action, why = "run", "selected" if only else "--keep-serving"
        elif not selected:
            action, why = "not selected", "done" if done else "not done"
        elif force:
            action, why = "run", "--force"
        elif done:
            action, why = "skip", "up to date"
        else:
            action, why = "run", "no complete manifest" if m is None else "inputs changed"
        out.append(Decision(st, action, why, fp, folder, m if done else None))
    by = {d.stage.name: d for d in out}
    for d in reversed(out):  # uncached stages (a server) start when a running stage needs them
        if d.action == "run":
            for u in d.stage.upstream_for(cfg):
                if u in by and not by[u].stage.cached and by[u].action == "not needed":
                    by[u].action, by[u].reason = "run", f"needed by {d.stage.name}"
    problems = []
    for d in out:
        if d.action != "run":
            continue
        for u in d.stage.upstream_for(cfg):
            up = by.get(u)
            if up and up.action not in ("run", "n/a") and up.manifest is None:
                problems.append(f"stage {d.stage.name} needs {u}, which is not done for this configuration; "
                                f"add it to --stages or run without --stages")
    return out, problems


@contextmanager
def stage_log(path: Path):
    """Send every log record (and warning) emitted during a stage to `path` (a new file renamed
    into place, only over a log we wrote: safe_files.open_generated)."""
    handler = logging.StreamHandler(open_generated(path, "stage log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.handleError = _stop_when_full(handler, path)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        handler.stream.close()


def _stop_when_full(handler: logging.Handler, path: Path):
    """The handler's handleError: a log on a full file system stops the stage with one `error:`
    line (logging's default prints a traceback and goes on); later records go nowhere."""
    default = handler.handleError

    def handle(record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not is_no_space(error):
            return default(record)
        if getattr(handler, "full", False):
            return None
        handler.full = True
        stream, handler.stream = handler.stream, open(os.devnull, "w")  # noqa: SIM115 (the handler closes it)
        try:
            stream.close()  # its unwritten buffer cannot be written: drop it with the file
        except OSError:
            pass
        if threading.current_thread() is not threading.main_thread():
            return None  # a log pump thread (the server's) cannot stop the stage: its lines are dropped
        raise no_space(path, len(handler.format(record)) + 1, "the stage log") from None

    return handle


def _run_one(cfg: PipelineConfig, d: Decision, manifests: dict, dirs: dict, stack: ExitStack, services: dict) -> dict:
    st = d.stage
    ups = [u for u in st.upstream_for(cfg) if u in manifests]
    with stage_log(cfg.output("logs") / f"{st.name}.log"):
        log.info("stage %s: %s (fingerprint %s)", st.name, d.reason, d.fingerprint)
        tmp = None
        if d.out:
            clean_stale(d.out)
            check_replaceable(d.out, st.name)
            tmp = new_tmp(d.out, st.name)
        ctx = StageContext(cfg, tmp, d.out, {u: manifests[u] for u in ups}, {u: dirs[u] for u in ups if u in dirs},
                           stack, services, logging.getLogger(f"grok_deploy.stage.{st.name}"))
        t0 = time.perf_counter()
        try:
            result = dict(st.run(ctx) or {})
            seconds = time.perf_counter() - t0
            passed = result.get("passed", True) is not False
            meta = {"name": st.name, "fingerprint": d.fingerprint, "version": __version__,
                    "inputs": {k: cfg.get(k) for k in st.keys_for(cfg)},
                    "upstream": {u: manifests[u]["runner"]["fingerprint"] for u in ups},
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "seconds": round(seconds, 3), "complete": True}
            doc = {**result, "runner": meta}
            if tmp is not None:
                commit(tmp, d.out, doc, write=passed, kind=st.name)
                dirs[st.name] = d.out
        except BaseException as e:
            log.exception("stage %s failed", st.name)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_no_space(e):  # what the stage core did not name itself
                raise no_space(d.out or cfg.root, None, f"stage {st.name}") from None
            raise
        log.info("stage %s %s in %.1f s", st.name, "done" if passed else "FAILED its check", seconds)
    manifests[st.name] = doc
    return doc


def write_problem(cfg: PipelineConfig, decisions: list[Decision], running_only: bool = True) -> str | None:
    """The first thing the scheduled stages would write over that is not theirs (a stage folder,
    a stage log, verify's report copies in the reports folder), as a message; None when all is ours."""
    for d in decisions:
        if d.out is None or d.action == "n/a" or (running_only and d.action != "run"):
            continue
        problem = replace_problem(d.out, d.stage.name)
        if problem:
            return f"stage {d.stage.name}: {problem}"
    for d in decisions:
        if d.action != "run":
            continue
        files = [cfg.output("logs") / f"{d.stage.name}.log"]
        if d.stage.name == "verify":
            from grok_deploy.verify.compare import REPORT_FILES

            files += [d.out.parent / name for name in REPORT_FILES]
        for f in files:
            problem = replace_file_problem(f, new_folder_ok=True)
            if problem:
                return f"stage {d.stage.name}: {problem}"
    return None


def lock_roots(cfg: PipelineConfig, table: list[Stage] | None = None) -> list[Path]:
    """The folders whose lock a run holds: the pipeline's folder, and the parent of every output
    folder outside it."""
    roots = {cfg.root}
    for st in STAGES if table is None else table:
        out = st.out(cfg) if st.out else None
        if out is not None and not out.is_relative_to(cfg.root):
            roots.add(out.parent)
    return sorted(roots)


def run_pipeline(cfg: PipelineConfig, only: list[str] | None = None, force: bool = False,
                 keep_serving: bool = False, table: list[Stage] | None = None, echo=print) -> tuple[int, list[dict]]:
    """Run the scheduled stages; returns (exit code, summary rows). Raises UserError on bad input.

    The run holds the lock of every output root (a second run there gets an `error:` naming this
    one's pid), first removes what interrupted runs left behind, and refuses, before running
    anything, an output folder that holds something it did not write."""
    with ExitStack() as locks:
        for root in lock_roots(cfg, table):
            with space_errors(root, None, "the lock file"):
                locks.enter_context(lock(root, f"grok-deploy run {cfg.file}"))
        return _run_locked(cfg, only, force, keep_serving, table, echo)


def _run_locked(cfg, only, force, keep_serving, table, echo) -> tuple[int, list[dict]]:
    decisions, problems = schedule(cfg, only, force, keep_serving, table)
    if problems:
        raise UserError(problems[0])
    if any(d.action == "run" and d.stage.reads_source for d in decisions):
        for key, path in cfg.missing_paths():
            raise cfg.fail(key, f"{path} does not exist")
    for d in decisions:
        if d.out is not None:
            clean_stale(d.out)
    problem = write_problem(cfg, decisions)
    if problem:
        raise UserError(problem)
    manifests = {d.stage.name: d.manifest for d in decisions if d.manifest}  # done: cached or not selected
    dirs = {d.stage.name: d.out for d in decisions if d.manifest}
    rows, code, services = [], 0, {}
    with ExitStack() as stack:
        try:
            for d in decisions:
                row = {"stage": d.stage.name, "status": d.action, "seconds": None, "out": d.out}
                rows.append(row)
                if d.action != "run":
                    row["status"] = {"skip": "skipped"}.get(d.action, d.action)
                    continue
                if code:
                    row["status"] = "not run"
                    continue
                t0 = time.perf_counter()
                row["status"] = "error"
                print(f"[{d.stage.name}] running ({d.reason}); log in {cfg.output('logs') / d.stage.name}.log",
                      file=sys.stderr, flush=True)
                doc = _run_one(cfg, d, manifests, dirs, stack, services)
                row["seconds"] = time.perf_counter() - t0
                row["status"] = "done" if doc.get("passed", True) is not False else "FAILED"
                code = 0 if row["status"] == "done" else 1
        finally:
            echo(summary(rows))
        verdict = manifests.get("verify")
        if verdict is not None and "passed" in verdict:
            echo(f"verification: {'PASSED' if verdict['passed'] else 'FAILED'} "
                 f"(report in {cfg.output('reports') / 'verify'})")
        if keep_serving and "server" in services and code == 0:
            _serve_until_interrupted(services, echo)
    return code, rows


def _serve_until_interrupted(services: dict, echo) -> None:
    echo(f"serving on {services.get('url')} (gRPC); Ctrl-C to stop")
    try:
        wait = getattr(services["server"], "wait", None)
        while True:
            wait() if wait else time.sleep(3600)
    except KeyboardInterrupt:
        echo("stopping the server")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def summary(rows: list[dict]) -> str:
    """The table printed at the end: stage, status, seconds, output size and folder."""
    lines = [f"{'stage':<13} {'status':<13} {'seconds':>8}  {'size':>10}  output"]
    for r in rows:
        if r["status"] == "n/a":
            continue
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        size = _size(folder_bytes(r["out"])) if r["out"] is not None and r["out"].exists() else "-"
        lines.append(f"{r['stage']:<13} {r['status']:<13} {secs:>8}  {size:>10}  {r['out'] or '-'}")
    return "\n".join(lines)


def cli_run(args) -> int:
    cfg = load_pipeline(args.pipeline)
    only = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    code, _ = run_pipeline(cfg, only, force=args.force, keep_serving=getattr(args, "keep_serving", False))
    return code
