"""Forged and foreign folder shapes for the data-loss tests (issue 22): each builds a folder at
`target` that no grok-deploy stage may replace, and says which entry the refusal must name."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from grok_deploy.manifest import MARK, commit, new_tmp


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` as (type, sha256 of a file's bytes | a link's target), symlinks
    not followed: the user's files hashed, before and after."""
    out = {}
    for dirpath, dirnames, files in os.walk(root, followlinks=False):
        for name in dirnames + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def _user_files(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    (target / "thesis.txt").write_text("years of work\n")
    (target / "sub").mkdir(exist_ok=True)
    (target / "sub" / "data.csv").write_text("a,b\n1,2\n")


def _ours(target: Path, stage: str) -> None:
    """A real grok-deploy output of `stage` at `target` (the mark and inventory commit writes)."""
    tmp = new_tmp(target, stage)
    (tmp / "model.bin").write_bytes(b"\x01" * 64)
    (tmp / "weights").mkdir()
    (tmp / "weights" / "rank0.safetensors").write_bytes(b"\x02" * 32)
    commit(tmp, target, {"runner": {"name": stage, "fingerprint": "f", "complete": True}}, kind=stage)


def user_folder(t: Path, stage: str) -> str:
    _user_files(t)
    return "sub"


def forged_mark(t: Path, stage: str) -> str:  # an earlier release's mark, or a hand-written one
    _user_files(t)
    (t / MARK).write_text(json.dumps({"made_by": "grok-deploy", "stage": stage}) + "\n")
    return "sub"


def forged_mark_v2(t: Path, stage: str) -> str:  # this release's format, listing nothing
    _user_files(t)
    doc = {"made_by": "grok-deploy", "mark": 2, "stage": stage, "path": str(t.resolve()), "folder": t.name,
           "pid": 1, "start": 1, "host": "x", "boot": "y", "entries": {"sub": ["d"]}}
    (t / MARK).write_text(json.dumps(doc))
    return "sub/data.csv"


def mark_directory(t: Path, stage: str) -> str:  # a `.grok-deploy/` folder holding data, nothing else
    (t / MARK).mkdir(parents=True)
    (t / MARK / "data.txt").write_text("mine")
    return MARK


def mark_alone(t: Path, stage: str) -> str:
    t.mkdir(parents=True)
    (t / MARK).write_text(json.dumps({"made_by": "grok-deploy", "stage": stage}))
    return MARK


def foreign_manifest(t: Path, stage: str) -> str:  # another tool's {"stage", "version"}
    _user_files(t)
    (t / "manifest.json").write_text(json.dumps({"stage": stage, "version": "2.1"}))
    return "sub"


def runner_manifest(t: Path, stage: str) -> str:  # a complete-looking manifest.json, no mark
    t.mkdir(parents=True)
    (t / "thesis.txt").write_text("years of work\n")
    (t / "manifest.json").write_text(json.dumps({"runner": {"name": stage, "fingerprint": "f", "complete": True}}))
    return "thesis.txt"


def copied_output_with_notes(t: Path, stage: str) -> str:  # cp -r of our output, then the user's notes
    orig = t.with_name(t.name + "-orig")
    _ours(orig, stage)
    shutil.copytree(orig, t, symlinks=True)
    (t / "NOTES.md").write_text("# how I ran it\n")
    (t / "hostfile").write_text("node-a slots=8\n")
    return "NOTES.md"


def ours_with_notes(t: Path, stage: str) -> str:  # our output where it was made, plus the user's files
    _ours(t, stage)
    (t / "NOTES.md").write_text("# how I ran it\n")
    (t / "hostfile").write_text("node-a slots=8\n")
    return "NOTES.md"


def ours_edited(t: Path, stage: str) -> str:  # one of our files changed by the user
    _ours(t, stage)
    with open(t / "weights" / "rank0.safetensors", "ab") as f:
        f.write(b"my edit")
    return "weights/rank0.safetensors"


def another_stages_output(t: Path, stage: str) -> str:
    _ours(t, "reference" if stage != "reference" else "convert")
    return "model.bin"


def readme_directory(t: Path, stage: str) -> str:  # README.md (kept when a file) as a folder
    (t / "README.md").mkdir(parents=True)
    (t / "README.md" / "notes.txt").write_text("mine")
    return "README.md"


def symlinked_mark(t: Path, stage: str) -> str:  # a valid mark listing the user's file, through a symlink
    _user_files(t)
    real = t.with_name(t.name + "-mark")
    real.mkdir()
    doc = {"made_by": "grok-deploy", "mark": 2, "stage": stage, "path": str(t.resolve()), "folder": t.name,
           "pid": 1, "start": 1, "host": "x", "boot": "y",
           "entries": {"sub": ["d"], "sub/data.csv": ["f", 8], "thesis.txt": ["f", 14]}}
    (real / "mark.json").write_text(json.dumps(doc))
    (t / MARK).symlink_to(real / "mark.json")
    return "sub"


def symlink_to_user_folder(t: Path, stage: str) -> str | None:
    real = t.with_name(t.name + "-real")
    _user_files(real)
    t.parent.mkdir(parents=True, exist_ok=True)
    t.symlink_to(real, target_is_directory=True)
    return None


def inside_another_output(t: Path, stage: str) -> str | None:  # nested: t inside a folder we made
    _ours(t.parent, "convert" if stage != "convert" else "reference")
    return None


SHAPES = {f.__name__: f for f in (
    user_folder, forged_mark, forged_mark_v2, mark_directory, mark_alone, foreign_manifest, runner_manifest,
    copied_output_with_notes, ours_with_notes, ours_edited, another_stages_output, readme_directory,
    symlinked_mark, symlink_to_user_folder, inside_another_output)}
