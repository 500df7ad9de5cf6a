"""`plan --k8s` (issue 22, items 2 and 7): the manifest is written to a temp name and renamed, never
over the pipeline file or a file grok-deploy did not write; names, the image and the model
volume's mount path are validated; the YAML comes from yaml.safe_dump, so a pipeline file name
with a newline cannot inject a document. Every refusal: one `error:` line, exit 2, nothing changed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from data_loss_shapes import snapshot
from grok_deploy.cli import main
from grok_deploy.errors import UserError
from grok_deploy.pipeline.schema import load_pipeline
from grok_deploy.serving import k8s
from rel_helpers import one_error_line

ROOT = Path(__file__).resolve().parents[2]


def _a100x2(folder: Path, name: str = "pipeline.yaml", outputs: dict | None = None) -> Path:
    """The two-node A100 pipeline, its relative paths inside `folder`."""
    text = (ROOT / "pipelines" / "grok-1-a100x2.yaml").read_text().replace(": ../", ": ./")
    for key, value in (outputs or {}).items():
        text = text.replace(f"  {key}: ./{'engines' if key == 'engines' else key}\n", f"  {key}: {value}\n")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hostfile").write_text("node-a slots=8\nnode-b slots=8\n")
    f = folder / name
    f.write_text(text)
    return f


def _plan(capsys, *args) -> tuple[int, str, str]:
    code = main(["plan", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["pipeline", "symlink-to-pipeline", "hardlink-to-pipeline", "user-file", "folder",
                                  "missing-folder", "fifo", "dev-full"])
def test_k8s_never_written_over_what_is_not_ours(kind, tmp_path, capsys):
    pipe = _a100x2(tmp_path / "p")
    target = {"pipeline": pipe, "missing-folder": tmp_path / "nope" / "lws.yaml",
              "dev-full": Path("/dev/full")}.get(kind, tmp_path / "p" / "lws.yaml")
    if kind == "symlink-to-pipeline":
        target.symlink_to(pipe)
    elif kind == "hardlink-to-pipeline":
        os.link(pipe, target)
    elif kind == "user-file":
        target.write_text("# my own manifest\nkind: Pod\n")
    elif kind == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif kind == "fifo":
        os.mkfifo(target)
    before = snapshot(tmp_path)
    code, out, err = _plan(capsys, pipe, "--k8s", target)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert str(target) in line
    assert {"pipeline": "that is the pipeline file", "symlink-to-pipeline": "that is the pipeline file",
            "hardlink-to-pipeline": "exists and was not written by grok-deploy",
            "user-file": "exists and was not written by grok-deploy", "folder": "exists and is a folder",
            "missing-folder": "does not exist", "fifo": "exists and is a FIFO",
            "dev-full": "exists and is a device"}[kind] in line, line
    assert snapshot(tmp_path) == before


def test_k8s_replaces_its_own_manifest_but_not_an_edited_one(tmp_path, capsys):
    pipe = _a100x2(tmp_path)
    lws = tmp_path / "lws.yaml"
    for _ in range(2):  # the second run replaces the first run's file (registered in .grok-deploy-files)
        code, out, err = _plan(capsys, pipe, "--k8s", lws)
        assert code == 0, err
    first = lws.read_text()
    assert [d["kind"] for d in yaml.safe_load_all(first)] == ["LeaderWorkerSet", "Service"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".grok-deploy-files", "hostfile", "lws.yaml", "pipeline.yaml"]
    lws.write_text(first.replace("replicas: 1", "replicas: 3"))  # the user's edit
    code, _, err = _plan(capsys, pipe, "--k8s", lws)
    assert code == 2 and f"{lws}: exists and was changed since grok-deploy wrote it" in one_error_line(err)
    assert "replicas: 3" in lws.read_text()


def test_a_newline_in_the_pipeline_file_name_injects_nothing(tmp_path, capsys):
    pipe = _a100x2(tmp_path, "a\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: evil}\n#.yaml")
    lws = tmp_path / "lws.yaml"
    code, _, err = _plan(capsys, pipe, "--k8s", lws)
    assert code == 0, err
    text = lws.read_text()
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["LeaderWorkerSet", "Service"] and "evil" not in str(docs)
    assert text.splitlines()[0].startswith('# grok-deploy plan --k8s: "a\\n---\\napiVersion: v1\\nkind: Pod')


@pytest.mark.parametrize("image", ["x\nkind: Pod", "has space", "Upper/Case:1", "", "a" * 600, "img:tag;rm -rf /",
                                   "registry.example/x:$(id)"])
def test_bad_images_are_refused(image, tmp_path, capsys):
    pipe = _a100x2(tmp_path)
    code, _, err = _plan(capsys, pipe, "--k8s", tmp_path / "lws.yaml", "--image", image)
    assert code == 2 and f"--image {image!r}: not a container image reference" in one_error_line(err)
    assert not (tmp_path / "lws.yaml").exists()


@pytest.mark.parametrize("image", ["nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3", "localhost:5000/grok/x",
                                   "grok-deploy-triton@sha256:" + "ab" * 32])
def test_good_images_are_written_as_given(image, tmp_path, capsys):
    pipe = _a100x2(tmp_path)
    code, _, err = _plan(capsys, pipe, "--k8s", tmp_path / "lws.yaml", "--image", image)
    assert code == 0, err
    lws = next(yaml.safe_load_all((tmp_path / "lws.yaml").read_text()))
    assert {lws["spec"]["leaderWorkerTemplate"][t]["spec"]["containers"][0]["image"]
            for t in ("leaderTemplate", "workerTemplate")} == {image}


@pytest.mark.parametrize("outputs,mount", [
    ({"engines": "/grok-e", "triton_repo": "/grok-t"}, "/"),
    ({"engines": "/proc/grok/e", "triton_repo": "/proc/grok/t"}, "/proc/grok"),
    ({"engines": "/usr/e", "triton_repo": "/usr/t"}, "/usr"),
    ({"engines": "./m\nx/e", "triton_repo": "./m\nx/t"}, None),
])
def test_mount_paths_are_validated(outputs, mount, tmp_path, capsys):
    quoted = {k: '"' + v.replace("\n", "\\n") + '"' for k, v in outputs.items()}
    pipe = _a100x2(tmp_path, outputs=quoted)
    mount = mount or str(tmp_path / "m\nx")
    code, _, err = _plan(capsys, pipe, "--k8s", tmp_path / "lws.yaml")
    assert code == 2
    line = one_error_line(err)
    assert f"--k8s: the model volume's mountPath {mount!r}" in line and "outputs.engines" in line, line
    assert not (tmp_path / "lws.yaml").exists()


@pytest.mark.parametrize("field,value", [("name", "Grok_1"), ("name", "x" * 57), ("name", "1grok"),
                                         ("volume_claim", "models\n- evil"), ("ssh_secret", "")])
def test_kubernetes_names_are_validated(field, value, tmp_path):
    cfg = load_pipeline(_a100x2(tmp_path))
    with pytest.raises(UserError, match="k8s (name|volume claim|ssh secret) "):
        k8s.manifests(cfg, **{field: value})
    assert len(k8s.manifests(cfg, name="grok-1", volume_claim="models.example", ssh_secret="ssh-key")) == 2
