"""The commands that take a pipeline.yaml and hand its sections to a stage: `serve`, `verify`, `bench`.

They live here, not beside their stages, so that no stage imports pipeline code (the schema is
the pipeline room's); `plan` and `run` are in plan.py and runner.py.
"""
from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager

from grok_deploy.errors import UserError
from grok_deploy.pipeline.schema import load_pipeline
from grok_deploy.serving.client import server_errors


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def cli_serve(args) -> int:
    """`grok-deploy serve [PIPELINE]`: the server in the foreground until Ctrl-C or SIGTERM."""
    cfg = load_pipeline(args.pipeline)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the server on SIGTERM too
    try:
        from grok_deploy.serving.deploy import TritonServer

        from grok_deploy.serving.guard import KILL_GRACE_S

        with TritonServer(cfg) as server:
            key = f"admin key in {server.admin_key_path}" if server.admin_key_path else "admin key: server.admin_key"
            metrics = (f"OpenAI http://{server.host}:{server.openai_port}/v1 (metrics at /metrics there)"
                       if server.frontend else f"metrics {server.metrics_url}")
            print(f"serving {server.repo} (pid {server.pid}) on {server.listening}: gRPC {server.grpc_url}, "
                  f"HTTP {server.http_url}, "
                  f"{metrics}; log {server.log_path}; {key}; Ctrl-C to stop", flush=True)
            problem = server.watch()  # returns when the server exited or a model's stub died
            server.stop(timeout=KILL_GRACE_S)  # a broken server: its stuck streams end with an error now
            raise UserError(f"{problem}; the server is stopped (see {server.log_path}); start it again with "
                            f"`grok-deploy serve {args.pipeline}`")
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0


def cli_verify(args) -> int:
    from grok_deploy.verify.compare import verify

    cfg = load_pipeline(args.pipeline)
    url = args.url or f"{cfg.server.address}:{cfg.server.grpc_port}"
    mode, _ = cfg.verify_mode()
    if mode == "score":  # the streamed reference scores the served tokens: needs the checkpoint only
        src = cfg.output("source") if cfg.model.source.format == "synthetic" else cfg.resolve(cfg.model.source.path)
        if not src.is_dir():
            raise UserError(f"{src}: no checkpoint; run `grok-deploy run {args.pipeline} --stages source` first")
        with _report_dir(cfg, "verify") as out:
            res = verify(cfg, url, None, out, source=src, mode="score")
        return 0 if res["passed"] else 1
    ref = cfg.output("reference")
    if not (ref / "manifest.json").is_file():
        raise UserError(f"{ref}: no reference outputs; run `grok-deploy run {args.pipeline} --stages source,reference` first")
    with _report_dir(cfg, "verify") as out:
        res = verify(cfg, url, ref, out)
    return 0 if res["passed"] else 1


@contextmanager
def _report_dir(cfg, stage: str):
    """The stage's reports folder, written as the stage writes it: a tmp folder swapped in whole,
    only over that stage's own folder (manifest.atomic_dir). No lock: a `run --keep-serving` holds
    the pipeline folder's while these commands query its server."""
    from grok_deploy.manifest import atomic_dir
    from grok_deploy.safe_files import replace_file_problem

    final = cfg.output("reports") / stage
    if stage == "verify":
        from grok_deploy.verify.compare import REPORT_FILES

        for name in REPORT_FILES:
            problem = replace_file_problem(final.parent / name, new_folder_ok=True)
            if problem:
                raise UserError(problem)
    with atomic_dir(final, stage) as tmp:
        yield tmp


@server_errors
def cli_bench(args) -> int:
    """`grok-deploy bench`: the concurrency sweep; report JSON/MD/PNG under the reports folder."""
    from grok_deploy.serving.bench import HEADER, bench

    cfg = load_pipeline(args.pipeline)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--concurrency {args.concurrency!r}: give comma-separated integers, e.g. 1,4,8") from None
    if not levels or min(levels) <= 0:
        raise UserError(f"--concurrency {args.concurrency!r}: every level must be a positive integer")
    out = cfg.output("reports") / "bench"
    if not args.json:
        print(HEADER, flush=True)
    with _report_dir(cfg, "bench") as tmp:
        doc = bench(cfg, url=args.url, out=tmp, concurrency=levels, requests=args.requests, warmup=args.warmup,
                    input_tokens=args.input_tokens, output_tokens=args.output_tokens, model=args.model,
                    tokenizer=args.tokenizer, echo=None if args.json else (lambda line: print(line, flush=True)))
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"report: {out / 'bench.md'} (and bench.json, bench.png)")
    return 0
