"""The multi-node mpirun command line run for real: 2 local "nodes" (an MPI hostfile of 127.0.0.1
slots), the gloo shard check as the payload, one pipeline stage per node (tp 1 x pp 2)."""
from __future__ import annotations

import json
import shutil
import stat

import pytest

from grok_deploy.errors import UserError
from grok_deploy.trtllm.check_shards import check_shards
from grok_deploy.trtllm.convert import convert
from grok_deploy.trtllm.mpi import mpirun_argv, mpirun_launcher, read_hostfile
TEST_PROMPT = "The answer to life the universe and everything is of course"

MPIRUN = shutil.which("mpirun")


def test_mpirun_argv_one_context_per_rank():
    argv = mpirun_argv([["a", "0"], ["b", "1"], ["c"]], hostfile="/h")
    assert argv == ["mpirun", "--allow-run-as-root", "--hostfile", "/h", "-n", "1", "a", "0", ":",
                    "-n", "1", "b", "1", ":", "-n", "1", "c"]
    assert mpirun_argv([["x"]])[:3] == ["mpirun", "--allow-run-as-root", "-n"]


def test_read_hostfile(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8  # the second\n\n127.0.0.1\n")
    assert read_hostfile(f) == [("node-a", 8), ("node-b", 8), ("127.0.0.1", 1)]
    f.write_text("node-a slots=x\n")
    with pytest.raises(UserError, match="line 1: 'node-a slots=x': slots must be a positive integer"):
        read_hostfile(f)
    with pytest.raises(UserError, match="cannot read the MPI hostfile"):
        read_hostfile(tmp_path / "missing")


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (apt-get install openmpi-bin)")
@pytest.mark.timeout(240)
def test_check_shards_over_two_local_nodes_under_mpirun(tiny_ckpt, tmp_path):
    convert(tiny_ckpt, tmp_path / "trt", tp=1, pp=2, workers=1, progress=False)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1\n127.0.0.1\n")  # one slot per line: two "nodes" of one rank each
    log = tmp_path / "mpirun.argv"
    wrapper = tmp_path / "mpirun"  # records the command line it is given, then runs the real mpirun
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\nexec {MPIRUN} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    res = check_shards(tmp_path / "trt", tiny_ckpt, TEST_PROMPT, max_tokens=4, timeout=200,
                       launch=mpirun_launcher(hostfile, mpirun=str(wrapper)))
    assert res["ok"] and res["tokens_match"] and res["world_size"] == 2, json.dumps(res)[:2000]
    assert res["mapping"]["pp_size"] == 2 and res["tensor_mismatches"] == []
    argv = log.read_text().splitlines()
    assert argv[:3] == ["--allow-run-as-root", "--hostfile", str(hostfile)]
    contexts = " ".join(argv[3:]).split(" : ")
    assert len(contexts) == 2 and all(c.startswith("-n 1 ") and c.endswith("job.json") for c in contexts)
    assert "-m grok_deploy.trtllm.mpi" in contexts[0]


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (apt-get install openmpi-bin)")
def test_too_few_slots(tiny_ckpt, tmp_path):
    convert(tiny_ckpt, tmp_path / "trt", tp=2, workers=1, progress=False)
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n")
    with pytest.raises(UserError, match="1 slots for 2 ranks"):
        check_shards(tmp_path / "trt", tiny_ckpt, TEST_PROMPT, max_tokens=2,
                     launch=mpirun_launcher(tmp_path / "hostfile"))
