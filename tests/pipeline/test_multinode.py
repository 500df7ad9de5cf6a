"""Multi-node serving as data: plan's per-GPU memory and fit verdict for Grok-1 over two nodes of
8 x A100 40 GB, the mpirun command with the hostfile and the leader/follower split, and the
Kubernetes manifest: pod templates and Service against the core/v1 schemas (kubernetes-validate,
offline), the LeaderWorkerSet against the documented leaderworkerset.x-k8s.io/v1 fields (a schema
subset vendored below from the API types, api/leaderworkerset/v1/leaderworkerset_types.go)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from grok_deploy.cli import main
from grok_deploy.pipeline.schema import load_pipeline
from grok_deploy.serving import k8s
from grok_deploy.errors import UserError
from grok_deploy.serving.deploy import TritonBinary, TritonServer, mpirun_command

kubernetes_validate = pytest.importorskip("kubernetes_validate")

A100X2 = """\
model:
  preset: grok-1
  source:
    format: xai
    path: /models/grok-1
parallel:
  tp: 8
  pp: 2
engine:
  backend: trtllm
  max_batch_size: 16
  max_input_len: 4096
  max_seq_len: 8192
  workers: 8
hardware:
  gpu_memory_gb: 40
  hbm_bandwidth_gbps: 1555
  gpus_per_node: 8
  nodes: 2
  hostfile: hostfile
verify:
  check_shards: false
  reference_dtype: bfloat16
"""

# leaderworkerset.x-k8s.io/v1, the fields of LeaderWorkerSetSpec and LeaderWorkerTemplate with
# their documented enums; unknown fields refused
LWS_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"}, "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["leaderWorkerTemplate"], "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "rolloutStrategy": {"type": "object"},
                "networkConfig": {"type": "object", "additionalProperties": False,
                                  "properties": {"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}}},
                "leaderWorkerTemplate": {
                    "type": "object", "required": ["workerTemplate"], "additionalProperties": False,
                    "properties": {
                        "leaderTemplate": {"type": "object"}, "workerTemplate": {"type": "object"},
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]},
                        "subGroupPolicy": {"type": "object"}, "volumeClaimTemplates": {"type": "array"},
                        "persistentVolumeClaimRetentionPolicy": {"type": "object"},
                    },
                },
            },
        },
    },
}


@pytest.fixture
def a100x2(tmp_path) -> Path:
    f = tmp_path / "grok-1-a100x2.yaml"
    f.write_text(A100X2)
    (tmp_path / "hostfile").write_text("node-a slots=8\nnode-b slots=8\n")
    return f


def test_plan_two_nodes_of_a100_40gb(a100x2, capsys):
    assert main(["plan", str(a100x2), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    mem = doc["memory"]
    # tp 8 x pp 2: half of the 64 layers per GPU, plus the embedding on the first stage (§9 x 1/2)
    assert mem["weights"]["per_layer"] == 615_479_296 and mem["weights"]["layers"] == 32 * 615_479_296
    assert mem["weights_bytes"] == 32 * 615_479_296 + 131072 * 6144 * 2
    assert mem["kv_bytes_per_token"] == 16 * 1024  # 32 local layers x 1 KV head
    assert doc["fits"] and doc["verdict"].startswith("w8a16 on 2 nodes x 8 GPUs fits: weights 21.3 GB")
    assert doc["memory_per_gpu_bytes"] < 40e9
    deploy = next(c for c in doc["commands"] if c["stage"] == "deploy")
    assert deploy["argv"][:4] == ["mpirun", "--allow-run-as-root", "--hostfile", str(a100x2.parent / "hostfile")]
    contexts = " ".join(deploy["argv"][4:]).split(" : ")
    assert len(contexts) == 16
    for rank, ctx in enumerate(contexts):
        silent = {"--allow-http=false", "--allow-grpc=false", "--allow-metrics=false", "--load-model=tensorrt_llm"}
        assert (silent <= set(ctx.split())) == (rank > 0), ctx
    assert "first host of" in deploy["note"]
    assert main(["plan", str(a100x2)]) == 0
    text = capsys.readouterr().out
    assert "2 nodes x 8 GPUs" in text.splitlines()[0]
    assert "weights             21.31 GB" in text and "of 40 GB" in text and "fits:" in text


def test_one_node_of_a100_40gb_does_not_fit_and_says_how(a100x2, capsys):
    one = a100x2.read_text().replace("  pp: 2\n", "  pp: 1\n").replace("  nodes: 2\n", "")
    a100x2.write_text(one)
    assert main(["plan", str(a100x2)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: w8a16 does not fit with the KV cache asked for at tp 8 x pp 1: weights 41.2 GB")
    assert "more ranks: parallel.pp 2 halves the layers per GPU (over hardware.nodes 2 x 8 GPUs" in err


def test_mpirun_with_a_hostfile_silences_the_followers():
    cmd = mpirun_command("/repo", 3, hostfile="/etc/hosts.mpi")
    assert cmd[:4] == ["mpirun", "--allow-run-as-root", "--hostfile", "/etc/hosts.mpi"]
    ranks = " ".join(cmd[4:]).split(" : ")
    assert "--allow-grpc=false" not in ranks[0] and all("--allow-grpc=false" in r for r in ranks[1:])
    assert "--hostfile" not in mpirun_command("/repo", 2)  # one node: unchanged


def test_deploy_refuses_a_missing_hostfile(a100x2, tmp_path):
    cfg = load_pipeline(a100x2)
    (tmp_path / "hostfile").unlink()
    server = TritonServer(cfg, tmp_path)
    assert server.hostfile == tmp_path / "hostfile"
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    found = TritonBinary(Path("/bin/tritonserver"))
    with pytest.raises(UserError, match=r"hostfile \(hardware.hostfile\) does not exist"):
        server.command(found)


def test_kubernetes_manifest_validates(a100x2, tmp_path, capsys):
    out = tmp_path / "lws.yaml"
    assert main(["plan", str(a100x2), "--k8s", str(out), "--image", "registry.example/grok-deploy:1"]) == 0
    assert f"wrote {out}: LeaderWorkerSet of 2 pods x 8 GPUs" in capsys.readouterr().out
    lws, service = list(yaml.safe_load_all(out.read_text()))
    jsonschema.validate(lws, LWS_SCHEMA)
    spec = lws["spec"]["leaderWorkerTemplate"]
    assert spec["size"] == 2 and lws["spec"]["replicas"] == 1  # one leader + one worker
    version = kubernetes_validate.latest_version()
    for role in ("leaderTemplate", "workerTemplate"):
        template = spec[role]
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}, "template": template}
        kubernetes_validate.validate(pod_template, version, strict=True)  # raises on any bad field
        (c,) = template["spec"]["containers"]
        assert c["image"] == "registry.example/grok-deploy:1"
        assert c["resources"]["limits"] == {"nvidia.com/gpu": 8}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["models"] == str(tmp_path) and mounts["dshm"] == "/dev/shm"  # engines + triton_repo live there
        claims = [v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["grok-deploy-models"]
    leader = spec["leaderTemplate"]["spec"]["containers"][0]
    assert leader["readinessProbe"]["grpc"]["port"] == 8001 and {"containerPort": 8001, "name": "grpc"} in leader["ports"]
    kubernetes_validate.validate(service, version, strict=True)
    assert service["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": "grok-1", "role": "leader"}
    bad = json.loads(json.dumps(lws))
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, LWS_SCHEMA)
    bad_pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
               "template": {"spec": {"containers": [{"name": "c", "image": "i", "resourcez": {}}]}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_pod, version, strict=True)


def test_leader_script_writes_the_hostfile_from_the_group_and_runs_mpirun(a100x2, tmp_path):
    cfg = load_pipeline(a100x2)
    hostfile = tmp_path / "mpi-hosts"
    script = k8s.leader_script(cfg).replace(k8s.HOSTFILE, str(hostfile))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "getent").write_text("#!/bin/sh\necho \"$2\" >> %s\n" % (tmp_path / "resolved"))
    (bindir / "mpirun").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "LWS_GROUP_SIZE": "2",
           "LWS_LEADER_ADDRESS": "grok-1-0.grok-1.default"}
    res = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert hostfile.read_text() == "grok-1-0.grok-1.default slots=8\ngrok-1-0-1.grok-1.default slots=8\n"
    assert (tmp_path / "resolved").read_text() == "grok-1-0-1.grok-1.default\n"  # waited for the worker
    argv = res.stdout.splitlines()
    assert argv[:3] == ["--allow-run-as-root", "--hostfile", str(hostfile)]
    assert argv.count(":") == 15 and "--grpc-address=0.0.0.0" in argv  # pods serve on their own address
