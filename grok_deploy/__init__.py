"""grok-deploy: Grok-1 from released weights to a verified, served model.

The package is laid out as the pipeline flows, one room (subpackage) per part of it. `LAYERS`
lists the rooms from the bottom up: a module may import its own room and the rooms of lower
layers, never a higher one (tests/test_layout.py walks every import to hold this). The
top-level module `errors` (the one user-facing exception) is the foundation; `manifest`,
`progress`, `safe_files` and `host` (cores and disk rate for the estimates) are the ground floor
every room may use; `cli` is the roof.
"""

__version__ = "0.1.0"

# bottom -> top; rooms in one tuple are peers and may not import each other
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("manifest", "progress", "safe_files", "host"),
    ("model",),
    ("checkpoint",),
    ("trtllm", "onnx"),
    ("serving",),
    ("verify",),
    ("pipeline",),
    ("cli",),
)
