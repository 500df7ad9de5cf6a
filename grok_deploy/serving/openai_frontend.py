"""Triton's OpenAI-compatible frontend (`server.openai_port`): /v1/completions and
/v1/chat/completions over the ensemble or the BLS.

The frontend is triton-inference-server/server `python/openai/openai_frontend/main.py`, shipped in
the TensorRT-LLM container at FRONTEND_MAIN (read at commit 09a0868a: flags --model-repository,
--tokenizer, --host, --openai-port, --enable-kserve-frontends, --kserve-http-port,
--kserve-grpc-port). It does not connect to a running tritonserver: it starts Triton in its own
process (`tritonserver.Server(model_repository=...)`). Started beside a tritonserver it would load
the engine a second time (Grok-1 does not fit twice) and, outside mpirun, with the wrong world
size. So with `server.openai_port` deploy runs the frontend IN PLACE of rank 0's tritonserver, with
the KServe HTTP and gRPC frontends on the pipeline's ports (verify, bench and every KServe client
keep working); ranks > 0 stay tritonserver followers. Triton's metrics are then served by the
frontend at http://<address>:<openai_port>/metrics. Where FRONTEND_MAIN is absent (any host but
the container) deploy and plan say so in one line and serve with tritonserver alone.

For each request the frontend sends `_create_trtllm_generate_request` (engine/utils/triton.py):
text_input [[prompt]], stream, max_tokens, optional stop_words / top_p / penalties / seed /
temperature / exclude_input_in_output / guided decoding, and return_num_input_tokens /
return_num_output_tokens, whose outputs become the response's `usage`.
"""
from __future__ import annotations

import urllib.request
from pathlib import Path

FRONTEND_MAIN = Path("/opt/tritonserver/python/openai/openai_frontend/main.py")
TOKENIZER = Path("preprocessing") / "tokenizer"  # the Hugging Face folder package writes (chat templates)


def frontend_main() -> Path | None:
    """The container's frontend, when this host has it."""
    return FRONTEND_MAIN if FRONTEND_MAIN.is_file() else None


def frontend_argv(repo, address: str, openai_port: int, grpc_port: int, http_port: int,
                  python: str = "python3") -> list[str]:
    """The frontend's command: the model repository, its packaged tokenizer, the OpenAI port, and
    the KServe frontends on the ports tritonserver would have opened."""
    repo = Path(repo)
    return [python, str(FRONTEND_MAIN), "--model-repository", str(repo), "--tokenizer", str(repo / TOKENIZER),
            "--host", address, "--openai-port", str(openai_port), "--enable-kserve-frontends",
            "--kserve-http-port", str(http_port), "--kserve-grpc-port", str(grpc_port)]


def replace_leader(cmd: list[str], binary: str, frontend: list[str]) -> list[str]:
    """`cmd` (a tritonserver command, or mpirun with one app context per rank, ':' between them)
    with the first context, rank 0's tritonserver, replaced by `frontend`."""
    start = cmd.index(binary)
    end = cmd.index(":", start) if ":" in cmd[start:] else len(cmd)
    return [*cmd[:start], *frontend, *cmd[end:]]


def absent_note(openai_port: int) -> str:
    return (f"note: server.openai_port {openai_port}: Triton's OpenAI frontend ({FRONTEND_MAIN}) is not on this "
            "host (it ships in nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3); serving without it")


# main.py starts Triton in-process with no --grpc-restricted-protocol / --http-restricted-api
# equivalent: with the frontend on, the admin key guards nothing on rank 0's KServe ports.
UNGUARDED = ("Triton's OpenAI frontend starts Triton in-process without the restricted-API options, so its KServe "
             "ports serve the shared-memory, model-repository and logging APIs to any client (no admin key); "
             "keep server.address 127.0.0.1 or put the ports behind a proxy that drops those routes")


def with_frontend(cmd: list[str], binary: str, repo, address: str, ports: dict, openai_port: int | None,
                  note=print) -> list[str]:
    """`cmd` with the frontend in rank 0's place when `openai_port` is set and the frontend is on
    this host; otherwise `cmd`, and (port set, frontend absent) one `note` line."""
    if openai_port is None:
        return cmd
    if frontend_main() is None:
        note(absent_note(openai_port))
        return cmd
    return replace_leader(cmd, binary, frontend_argv(repo, address, openai_port, ports["grpc"], ports["http"]))


def is_ready(host: str, openai_port: int) -> bool:
    """The frontend's own readiness route (it answers once uvicorn serves, after Triton is ready)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{openai_port}/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def planned(argv: list[str], binary: str, repo, server) -> tuple[list[str], str]:
    """(deploy command, note) for `plan` with server.openai_port set: the command as deploy runs
    it where the frontend exists (the container), and a line saying what runs; one more sentence
    when this host lacks the frontend."""
    cmd = replace_leader(argv, binary, frontend_argv(repo, server.address, server.openai_port, server.grpc_port,
                                                     server.http_port))
    note = (f"rank 0 runs Triton's OpenAI frontend (Triton in-process): OpenAI API on port {server.openai_port} "
            f"(/v1/completions, /v1/chat/completions, /metrics), KServe gRPC {server.grpc_port} and HTTP "
            f"{server.http_port} as usual")
    if frontend_main() is None:
        note += f"; {FRONTEND_MAIN} is not on this host: deploy here serves without it"
    return cmd, note
