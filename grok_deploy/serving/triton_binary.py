"""Which `tritonserver` to run: the pipeline's `server.binary`, one on PATH, or the binary that the
nvidia-pytriton wheel bundles (with this interpreter's python-backend stub beside it)."""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grok_deploy.errors import UserError


@dataclass
class TritonBinary:
    path: Path
    env: dict = field(default_factory=dict)   # added to the environment (LD_LIBRARY_PATH, PATH)
    backend_dir: Path | None = None           # --backend-directory (bundled server only)
    source: str = "path"                      # "pipeline" | "path" | "pytriton"


def _bundled() -> TritonBinary | None:
    """The tritonserver of the nvidia-pytriton wheel, with the python stub of this interpreter
    copied beside libtriton_python.so in a private copy of its backends (site-packages untouched)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        return None
    dist = Path(spec.origin).parent / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        return None
    backends = Path(sys.prefix) / "share" / "grok-deploy" / f"triton-backends-py{version}"
    if not (backends / "python" / stub.name).is_file() or \
            (backends / "python" / stub.name).stat().st_size != stub.stat().st_size:
        tmp = backends.with_name(f"{backends.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dist / "backends", tmp, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / stub.name)
        shutil.rmtree(backends, ignore_errors=True)
        os.replace(tmp, backends)
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    ld = os.pathsep.join(p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))  # the stub's python
    return TritonBinary(binary, {"LD_LIBRARY_PATH": ld, "PATH": path}, backends, "pytriton")


def find_tritonserver(binary: str | None = "auto") -> TritonBinary:
    """The pipeline's `server.binary` when set, else `tritonserver` on PATH, else the binary bundled
    in the nvidia-pytriton wheel."""
    if binary and binary != "auto":
        p = Path(binary).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise UserError(f"server.binary: {binary} is not an executable file; give a tritonserver path or `auto`")
        return TritonBinary(p.resolve(), source="pipeline")
    which = shutil.which("tritonserver")
    if which:
        return TritonBinary(Path(which), source="path")
    found = _bundled()
    if found is None:
        raise UserError("tritonserver not found: set server.binary, put tritonserver on PATH, or install "
                        "the triton extra (pip install -e .[triton]: nvidia-pytriton bundles one)")
    return found
