"""Command-line interface: thin argparse wrappers around the stage functions.

Each command's handler lives beside its stage as `cli_<command>(args) -> int` (the commands
that read a pipeline.yaml in pipeline/) and is imported
lazily, so `grok-deploy --help` and `plan` start without importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from grok_deploy import __version__
from grok_deploy.errors import UserError, is_no_space, os_error_message

# command -> (module, handler). Arguments are declared below, exactly as interface.md.
HANDLERS = {
    "make-tiny": ("grok_deploy.checkpoint.tiny", "cli_make_tiny"),
    "inspect": ("grok_deploy.checkpoint.info", "cli_inspect"),
    "generate": ("grok_deploy.verify.reference", "cli_generate"),
    "convert": ("grok_deploy.trtllm.convert", "cli_convert"),
    "check-shards": ("grok_deploy.trtllm.check_shards", "cli_check_shards"),
    "preprocess": ("grok_deploy.trtllm.build", "cli_preprocess"),
    "export-onnx": ("grok_deploy.onnx.export", "cli_export_onnx"),
    "plan": ("grok_deploy.pipeline.plan", "cli_plan"),
    "run": ("grok_deploy.pipeline.runner", "cli_run"),
    "serve": ("grok_deploy.pipeline.commands", "cli_serve"),
    "query": ("grok_deploy.serving.client", "cli_query"),
    "verify": ("grok_deploy.pipeline.commands", "cli_verify"),
    "bench": ("grok_deploy.pipeline.commands", "cli_bench"),
}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors too: one `error:` line, exit 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="grok-deploy", description="Grok-1 from released weights to a verified, served model.")
    p.add_argument("--version", action="version", version=f"grok-deploy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("make-tiny", help="write a random model of a preset in the official checkpoint format")
    s.add_argument("out")
    s.add_argument("--preset", default="grok-1-tiny")
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("inspect", help="list a checkpoint's tensors without loading them")
    s.add_argument("ckpt")
    s.add_argument("--preset", default=None, help="model preset, when the shapes do not identify one")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("generate", help="reference run of the PyTorch model on the original weights")
    s.add_argument("ckpt")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    s.add_argument("--preset", default=None)
    s.add_argument("--json", action="store_true")
    s.add_argument("--logits", action="store_true", help="with --json: the full-vocabulary logits of each generated token")

    s = sub.add_parser("convert", help="convert to a TensorRT-LLM checkpoint")
    s.add_argument("ckpt")
    s.add_argument("out")
    s.add_argument("--tp", type=int, required=True)
    s.add_argument("--moe-tp", type=int, default=None)
    s.add_argument("--moe-ep", type=int, default=None)
    s.add_argument("--pp", type=int, default=1)
    s.add_argument("--quant", choices=["w8a16", "none"], default="w8a16")
    s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--preset", default=None)

    s = sub.add_parser("check-shards", help="run the TensorRT-LLM rank files with torch.distributed and compare with the reference")
    s.add_argument("trtllm_dir")
    s.add_argument("--source", required=True)
    s.add_argument("--prompt", default="The answer to life the universe and everything is of course")
    s.add_argument("--max-tokens", type=int, default=8)
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("preprocess", help="GPU host: pass a converted checkpoint's int8 weights through TensorRT-LLM's "
                       "mixed-GEMM preprocessing, for trtllm-build --checkpoint_dir OUT")
    s.add_argument("trtllm_dir")
    s.add_argument("out")

    s = sub.add_parser("export-onnx", help="export an ONNX decoder with a KV cache")
    s.add_argument("ckpt")
    s.add_argument("out")
    s.add_argument("--quant", choices=["none", "int8"], default="none")
    s.add_argument("--preset", default=None)
    s.add_argument("--graph", choices=["fused", "standard"], default="fused",
                   help="fused: ONNX Runtime's GroupQueryAttention and fused norms (default); standard: standard ops only")

    for name, helptext in (("plan", "validate the pipeline; print stages, commands and per-GPU memory"),
                           ("run", "run the pipeline, skipping stages whose inputs did not change"),
                           ("serve", "start the Triton server in the foreground"),
                           ("verify", "query the served model and compare with the reference"),
                           ("bench", "streaming load over gRPC")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("pipeline", nargs="?", default="pipeline.yaml")
        if name == "plan":
            s.add_argument("--json", action="store_true")
            s.add_argument("--k8s", default=None, metavar="FILE", help="trtllm: also write the Kubernetes manifest "
                           "(a LeaderWorkerSet over hardware.nodes nodes and a Service on the leader)")
            s.add_argument("--image", default=None, help="container image of the --k8s pods")
        if name == "run":
            s.add_argument("--stages", default=None, help="comma-separated stage names")
            s.add_argument("--force", action="store_true")
            s.add_argument("--keep-serving", action="store_true")
        if name in ("verify", "bench"):
            s.add_argument("--url", default=None, help="HOST:PORT of a running server's gRPC endpoint")
        if name == "bench":
            s.add_argument("--concurrency", default="1,4,8", help="comma-separated levels (a sweep)")
            s.add_argument("--requests", type=int, default=16, help="measured requests per concurrency level")
            s.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each level")
            s.add_argument("--input-tokens", type=int, default=64, help="synthetic prompt length, exact")
            s.add_argument("--output-tokens", type=int, default=32, help="generated tokens per request (ignore-EOS)")
            s.add_argument("--model", default="ensemble", help="ensemble, tensorrt_llm_bls or tensorrt_llm")
            s.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the source stage's)")
            s.add_argument("--json", action="store_true")

    s = sub.add_parser("query", help="one request over gRPC to the ensemble model")
    s.add_argument("text")
    s.add_argument("--url", default="127.0.0.1:8001")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--stream", action="store_true")
    s.add_argument("--json", action="store_true")
    return p


MAX_MESSAGE = 2000


def one_line(message: str) -> str:
    """A user error as one readable line: newlines folded, a huge value cut."""
    message = " ".join(message.split("\n"))
    if len(message) <= MAX_MESSAGE:
        return message
    # cut in the middle: the start names the file or key, the end says what is wrong and what to do
    half = MAX_MESSAGE // 2
    return f"{message[:half]} ... ({len(message) - 2 * half} characters cut) ... {message[-half:]}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as from Ctrl-C: every stage
    removes its temporary folder and stops its worker processes on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, handler = HANDLERS[args.command]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(getattr(importlib.import_module(module), handler)(args) or 0)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `grok-deploy inspect ... | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as e:  # the last resort for file system errors a command did not name itself
        if isinstance(e, OSError) and e.filename is not None:
            message = os_error_message(e)
        elif is_no_space(e):
            message = "no space left on the device (or quota exceeded) while writing; free space and run again"
        else:
            raise
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(f"error: {'terminated (SIGTERM)' if term else 'interrupted'}; nothing half-written was kept", file=sys.stderr)
        return 143 if term else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
