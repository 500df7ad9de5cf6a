"""Kubernetes manifest of the multi-node launch: a LeaderWorkerSet (leaderworkerset.x-k8s.io/v1)
with one leader and nodes-1 workers, one pod per node, and a Service on the leader.

The standard multi-node pattern of Triton's TensorRT-LLM backend on Kubernetes: the leader pod
writes an MPI hostfile from the names LWS gives the group's pods, waits until every worker
resolves, and runs the same mpirun leader-mode command as `plan` prints (rank 0 serves, the
other ranks load only tensorrt_llm and open no endpoint; triton-serving.md §9). Workers run sshd,
which mpirun reaches with the key of the `ssh_secret` Secret. Every pod mounts the shared model
volume at the path where the engines and triton_repo/ were written (config.pbtxt holds absolute
paths), requests its node's GPUs, and the leader is ready when its gRPC health check answers.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from grok_deploy.errors import UserError
from grok_deploy.serving.deploy import mpirun_command

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
HOSTFILE = "/tmp/grok-deploy-hostfile"
DEFAULT_IMAGE = "grok-deploy-triton:latest"  # FROM the Triton TensorRT-LLM image + grok-deploy + sshd

# Kubernetes names: a Service name is an RFC 1035 label (<= 63; "-leader" is appended to `name`),
# a PVC or Secret name an RFC 1123 subdomain (<= 253)
_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# an image reference as the distribution spec's grammar: [domain[:port]/]path[:tag][@digest]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_IMAGE = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?"
                    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")
# folders a model volume may not be mounted over (the container's own system)
_SYSTEM = ("/bin", "/boot", "/etc", "/home", "/lib", "/lib32", "/lib64", "/opt", "/root", "/sbin", "/srv", "/tmp",
           "/usr", "/var")
_NEVER_INSIDE = ("/dev", "/proc", "/sys", "/run")


def check_names(name: str, image: str, volume_claim: str, ssh_secret: str) -> None:
    """Refuse what kubectl would refuse, or what would change the manifest's meaning."""
    if not (isinstance(name, str) and _LABEL.fullmatch(name) and len(name) <= 56):
        raise UserError(f"k8s name {name!r}: use lower-case letters, digits and '-', starting with a letter, "
                        "at most 56 characters (the Service is NAME-leader, a 63-character DNS label)")
    for what, value in (("volume claim", volume_claim), ("ssh secret", ssh_secret)):
        if not (isinstance(value, str) and _SUBDOMAIN.fullmatch(value) and len(value) <= 253):
            raise UserError(f"k8s {what} {value!r}: use lower-case letters, digits, '-' and '.' (a DNS subdomain)")
    if not (isinstance(image, str) and len(image) <= 512 and _IMAGE.fullmatch(image)):
        raise UserError(f"--image {image!r}: not a container image reference; give [REGISTRY[:PORT]/]NAME[:TAG]"
                        "[@sha256:DIGEST], e.g. nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3")


def check_mount(cfg, path: str) -> None:
    """The model volume's mount path: absolute, normal, printable, and not over the container's system."""
    where = f"{cfg.where('outputs.engines')} and {cfg.where('outputs.triton_repo')}"
    bad = None
    if not path.startswith("/") or os.path.normpath(path) != path or "//" in path:
        bad = "is not a normal absolute path"
    elif any(not c.isprintable() for c in path) or ":" in path:
        bad = "holds a control character or ':'"
    elif path == "/" or path in _SYSTEM:
        bad = "would hide the container's own system folder"
    elif any(path == d or path.startswith(d + "/") for d in _NEVER_INSIDE):
        bad = "lies in a kernel or runtime file system of the container"
    if bad:
        raise UserError(f"--k8s: the model volume's mountPath {path!r} (the folder holding {where}) {bad}; "
                        "put the engines and triton_repo outputs under a folder of their own, e.g. /models")


def model_mount(cfg) -> str:
    """The folder holding the engines and the model repository (mounted at the same path in pods)."""
    return os.path.commonpath([str(cfg.output("engines")), str(cfg.output("triton_repo"))])


def leader_script(cfg) -> str:
    """sh -c program of the leader: hostfile from LWS's pod names, wait for the workers, mpirun."""
    s, per_node = cfg.server, cfg.world_size // cfg.hardware.nodes
    argv = mpirun_command(cfg.output("triton_repo"), cfg.world_size, address="0.0.0.0", grpc_port=s.grpc_port,
                          http_port=s.http_port, metrics_port=s.metrics_port, hostfile=HOSTFILE)
    if s.openai_port is not None:  # the image is the TensorRT-LLM container: its OpenAI frontend is rank 0
        from grok_deploy.serving.openai_frontend import frontend_argv, replace_leader

        argv = replace_leader(argv, "tritonserver", frontend_argv(cfg.output("triton_repo"), "0.0.0.0",
                                                                  s.openai_port, s.grpc_port, s.http_port))
    # LWS_LEADER_ADDRESS = <lws>-<group>.<lws>.<namespace>; worker i is <lws>-<group>-<i>.<lws>.<namespace>
    return "\n".join([
        "set -eu",
        'group="${LWS_LEADER_ADDRESS%%.*}"; domain="${LWS_LEADER_ADDRESS#*.}"',
        f'echo "$LWS_LEADER_ADDRESS slots={per_node}" > {HOSTFILE}',
        'for i in $(seq 1 $((LWS_GROUP_SIZE - 1))); do',
        f'  echo "$group-$i.$domain slots={per_node}" >> {HOSTFILE}',
        '  until getent hosts "$group-$i.$domain" > /dev/null; do sleep 2; done',
        'done',
        "exec " + shlex.join(argv),
    ])


def _pod(cfg, image: str, role: str, command: list[str], volume_claim: str, ssh_secret: str) -> dict:
    s, per_node, mount = cfg.server, cfg.world_size // cfg.hardware.nodes, model_mount(cfg)
    container = {
        "name": role, "image": image, "command": command,
        "resources": {"limits": {"nvidia.com/gpu": per_node}},
        "volumeMounts": [{"name": "models", "mountPath": mount},
                         {"name": "dshm", "mountPath": "/dev/shm"},  # python-backend stubs (triton-serving.md §9)
                         {"name": "ssh", "mountPath": "/root/.ssh", "readOnly": True}],
    }
    if role == "leader":
        container["ports"] = [{"name": "grpc", "containerPort": s.grpc_port},
                              {"name": "http", "containerPort": s.http_port},
                              {"name": "metrics", "containerPort": s.metrics_port}]
        # ready = Triton's gRPC health service says SERVING: every model loaded on every rank; with the
        # OpenAI frontend as rank 0, its /health/ready (it answers once Triton in it is ready)
        probe = {"grpc": {"port": s.grpc_port}}
        if s.openai_port is not None:
            container["ports"].append({"name": "openai", "containerPort": s.openai_port})
            probe = {"httpGet": {"path": "/health/ready", "port": s.openai_port}}
        container["readinessProbe"] = {**probe, "periodSeconds": 10, "failureThreshold": 3}
        container["startupProbe"] = {**probe, "periodSeconds": 10,
                                     "failureThreshold": max(1, int(s.startup_timeout_s // 10))}
    else:
        container["ports"] = [{"name": "ssh", "containerPort": 22}]
    return {
        "metadata": {"labels": {"app": "grok-deploy", "role": role}},
        "spec": {
            "containers": [container],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": volume_claim}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
                        {"name": "ssh", "secret": {"secretName": ssh_secret, "defaultMode": 0o400}}],
        },
    }


def manifests(cfg, image: str = DEFAULT_IMAGE, name: str = "grok-1", volume_claim: str = "grok-deploy-models",
              ssh_secret: str = "grok-deploy-ssh") -> list[dict]:
    """[LeaderWorkerSet, Service] for the pipeline's tp x pp over hardware.nodes nodes."""
    check_names(name, image, volume_claim, ssh_secret)
    check_mount(cfg, model_mount(cfg))
    s = cfg.server
    lws = {
        "apiVersion": LWS_API, "kind": "LeaderWorkerSet",
        "metadata": {"name": name, "labels": {"app": "grok-deploy"}},
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",  # workers start with the leader, which waits for them
            "leaderWorkerTemplate": {
                "size": cfg.hardware.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",  # under mpirun the death of any rank ends the job
                "leaderTemplate": _pod(cfg, image, "leader", ["sh", "-c", leader_script(cfg)], volume_claim,
                                       ssh_secret),
                "workerTemplate": _pod(cfg, image, "worker", ["/usr/sbin/sshd", "-D", "-e"], volume_claim, ssh_secret),
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"{name}-leader", "labels": {"app": "grok-deploy"}},
        "spec": {"selector": {LWS_NAME_LABEL: name, "role": "leader"},
                 "ports": [{"name": "grpc", "port": s.grpc_port, "targetPort": s.grpc_port},
                           {"name": "http", "port": s.http_port, "targetPort": s.http_port},
                           {"name": "metrics", "port": s.metrics_port, "targetPort": s.metrics_port}]},
    }
    if s.openai_port is not None:
        service["spec"]["ports"].append({"name": "openai", "port": s.openai_port, "targetPort": s.openai_port})
    return [lws, service]


def render(cfg, **kwargs) -> tuple[str, list[dict]]:
    """The manifests as one multi-document YAML text (yaml.safe_dump: every string quoted as YAML
    needs), under a one-line comment whose file name is JSON-escaped (no line break gets in)."""
    import yaml

    docs = manifests(cfg, **kwargs)
    head = (f"# grok-deploy plan --k8s: {json.dumps(cfg.file.name)}, tp {cfg.parallel.tp} x pp {cfg.parallel.pp} "
            f"over {cfg.hardware.nodes} nodes (kubectl apply -f; needs the LeaderWorkerSet controller)\n")
    return head + yaml.safe_dump_all(docs, sort_keys=False), docs


def write_manifests(cfg, path, **kwargs) -> list[dict]:
    """The manifests as one multi-document YAML file at `path`: written to a temp name and renamed,
    never over the pipeline file or any file grok-deploy did not write (safe_files)."""
    from grok_deploy.safe_files import write_generated

    path = Path(path)
    if os.path.lexists(path) and os.path.realpath(path) == os.path.realpath(cfg.file):
        raise UserError(f"--k8s {path}: that is the pipeline file; nothing was written; give the manifest its "
                        "own file name, e.g. grok-1-k8s.yaml")
    text, docs = render(cfg, **kwargs)
    write_generated(path, text)
    return docs
