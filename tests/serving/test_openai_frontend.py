"""`server.openai_port`: Triton's OpenAI frontend in rank 0's place (serving/openai_frontend.py),
in plan and in deploy; on this host the frontend is absent, which both say in one line."""
from __future__ import annotations

import json
import shlex
import urllib.request
from pathlib import Path

import pytest
from serving_fixtures import SERVER_TIMEOUT_S, make_repo

from grok_deploy.cli import main
from grok_deploy.serving import openai_frontend as of
from grok_deploy.trtllm.mpi import mpirun_argv

# main.py's flags (triton-inference-server/server python/openai/openai_frontend/main.py @09a0868a)
FRONTEND_FLAGS = {"--model-repository", "--tokenizer", "--host", "--openai-port", "--enable-kserve-frontends",
                  "--kserve-http-port", "--kserve-grpc-port"}


def test_frontend_takes_rank_0s_place(tmp_path):
    front = of.frontend_argv(tmp_path / "repo", "127.0.0.1", 9000, 8001, 8000)
    assert front[:2] == ["python3", str(of.FRONTEND_MAIN)]
    assert {a for a in front if a.startswith("--")} == FRONTEND_FLAGS
    flags = {a: b for a, b in zip(front, front[1:]) if a.startswith("--")}
    assert flags["--tokenizer"] == str(tmp_path / "repo" / "preprocessing" / "tokenizer")
    assert (flags["--openai-port"], flags["--kserve-grpc-port"], flags["--kserve-http-port"]) == ("9000", "8001", "8000")
    ranks = [["/bin/tritonserver", f"--rank={r}"] for r in range(3)]
    cmd = of.replace_leader(mpirun_argv(ranks), "/bin/tritonserver", front)
    contexts = " ".join(cmd).split(" : ")
    assert contexts[0].endswith(" ".join(front)) and "--rank=0" not in cmd  # rank 0: the frontend
    assert contexts[1:] == ["-n 1 /bin/tritonserver --rank=1", "-n 1 /bin/tritonserver --rank=2"]
    assert of.replace_leader(["/bin/tritonserver", "--x"], "/bin/tritonserver", front) == front


def test_absent_frontend_is_one_line_and_present_replaces(tmp_path, monkeypatch):
    cmd, lines = ["/bin/tritonserver", "--model-repository=r"], []
    ports = {"grpc": 8001, "http": 8000, "metrics": 8002}
    assert of.with_frontend(cmd, "/bin/tritonserver", "r", "127.0.0.1", ports, None, lines.append) is cmd
    assert of.with_frontend(cmd, "/bin/tritonserver", "r", "127.0.0.1", ports, 9000, lines.append) is cmd
    assert len(lines) == 1 and "\n" not in lines[0] and str(of.FRONTEND_MAIN) in lines[0]
    assert "serving without it" in lines[0] and "26.07-trtllm-python-py3" in lines[0]
    main_py = tmp_path / "main.py"
    main_py.write_text("")
    monkeypatch.setattr(of, "FRONTEND_MAIN", main_py)
    got = of.with_frontend(cmd, "/bin/tritonserver", "r", "127.0.0.1", ports, 9000, lines.append)
    assert got[:2] == ["python3", str(main_py)] and len(lines) == 1


def test_plan_prints_the_frontend_command(tmp_path, capsys):
    from grok_deploy.pipeline.plan import commands
    from grok_deploy.pipeline.schema import load_pipeline

    cfg = load_pipeline(Path(__file__).parents[2] / "pipelines" / "grok-1-h100x8.yaml")
    cfg.server.openai_port = 9000
    deploy = next(c for c in commands(cfg) if c["stage"] == "deploy")
    contexts = deploy["command"].split(" : ")
    assert len(contexts) == cfg.world_size == 8
    first = shlex.split(contexts[0])
    assert first[first.index("python3") + 1] == str(of.FRONTEND_MAIN) and "--openai-port" in first
    assert all("tritonserver" in c and "main.py" not in c for c in contexts[1:])
    assert "OpenAI API on port 9000" in deploy["note"] and "is not on this host" in deploy["note"]
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("server:\n  openai_port: 9000\nverify:\n  check_shards: false\n")
    assert main(["plan", str(pipeline)]) == 0
    out = capsys.readouterr().out
    assert f"{of.FRONTEND_MAIN} --model-repository" in out and "is not on this host" in out
    assert main(["plan", str(pipeline), "--json"]) == 0  # the admin key cannot guard the frontend's Triton
    doc = json.loads(capsys.readouterr().out)
    assert any(w.endswith(of.UNGUARDED) and "server.openai_port" in w for w in doc["warnings"])


@pytest.mark.server
@pytest.mark.timeout(SERVER_TIMEOUT_S + 60)
def test_deploy_without_the_frontend_says_so_and_serves(tiny_ckpt, tmp_path, capfd):
    from grok_deploy.serving.deploy import TritonServer, free_port

    port = free_port()
    cfg, repo = make_repo(tmp_path, tiny_ckpt, extra=f"server:\n  openai_port: {port}\n")
    with TritonServer(cfg, repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout_s=SERVER_TIMEOUT_S) as s:
        assert not s.frontend and s.is_ready()
        with urllib.request.urlopen(f"{s.http_url}/v2/models/ensemble/ready", timeout=10) as r:
            assert r.status == 200
    err = [line for line in capfd.readouterr().err.splitlines() if "openai_port" in line]
    assert len(err) == 1 and err[0].startswith(f"note: server.openai_port {port}:")


FAKE_FRONTEND = '''\
"""Stands in for main.py where the container is absent: main.py's flags (argparse, so a flag deploy
gets wrong fails here), KServe readiness on --kserve-http-port, the frontend's on --openai-port."""
import argparse, http.server, json, signal, sys, threading

p = argparse.ArgumentParser()
for flag in ("--model-repository", "--tokenizer", "--host"):
    p.add_argument(flag, required=True)
for flag in ("--openai-port", "--kserve-http-port", "--kserve-grpc-port"):
    p.add_argument(flag, type=int, required=True)
p.add_argument("--enable-kserve-frontends", action="store_true")
a = p.parse_args()
json.dump(vars(a), open(a.model_repository + "/frontend-args.json", "w"))


def serve(port, path):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == path else 404)
            self.end_headers()
    s = http.server.HTTPServer((a.host, port), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()


serve(a.kserve_http_port, "/v2/health/ready")
serve(a.openai_port, "/health/ready")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.pause()
'''


@pytest.mark.timeout(120)
def test_deploy_runs_the_frontend_in_rank_0s_place(tiny_ckpt, tmp_path, monkeypatch):
    """deploy's side with the frontend present (its stand-in: the container is not here): the
    command, both readiness checks, and the stop."""
    import json

    from grok_deploy.serving.deploy import TritonServer, free_port

    fake = tmp_path / "main.py"
    fake.write_text(FAKE_FRONTEND)
    monkeypatch.setattr(of, "FRONTEND_MAIN", fake)
    port = free_port()
    cfg, repo = make_repo(tmp_path, tiny_ckpt, extra=f"server:\n  openai_port: {port}\n")
    with TritonServer(cfg, repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout_s=60) as s:
        assert s.frontend and s.is_ready() and of.is_ready(s.host, port)
        args = json.loads((repo / "frontend-args.json").read_text())
        assert args["openai_port"] == port and args["enable_kserve_frontends"]
        assert (args["kserve_grpc_port"], args["kserve_http_port"]) == (s.ports["grpc"], s.ports["http"])
        assert args["tokenizer"] == str(repo.resolve() / "preprocessing" / "tokenizer")
        proc = s.proc
    assert proc.poll() is not None and not of.is_ready("127.0.0.1", port)  # stopped with the server


def test_kubernetes_leader_runs_the_frontend(tmp_path):
    from grok_deploy.pipeline.schema import load_pipeline
    from grok_deploy.serving import k8s

    cfg = load_pipeline(Path(__file__).parents[2] / "pipelines" / "grok-1-a100x2.yaml")
    cfg.server.openai_port = 9000
    lws, service = k8s.manifests(cfg)
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    script = leader["command"][-1].splitlines()[-1]
    contexts = script.split(" : ")
    assert str(of.FRONTEND_MAIN) in contexts[0] and "--openai-port 9000" in contexts[0]
    assert len(contexts) == cfg.world_size and all("tritonserver" in c for c in contexts[1:])
    assert {"name": "openai", "containerPort": 9000} in leader["ports"]
    assert leader["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": 9000}
    assert {"name": "openai", "port": 9000, "targetPort": 9000} in service["spec"]["ports"]
