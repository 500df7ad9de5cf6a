"""The pipeline file's YAML reader: the document plus each key's line, in bounded memory.

`read_yaml(file)` returns the document and {key path tuple: 1-based line} (the line numbers that
schema.py's messages quote). A hostile file cannot make it grow: the file is read only when it is
a regular file of at most MAX_FILE_BYTES; the node tree is walked with anchors and aliases expanded
before anything is constructed, and the walk stops at MAX_NODES values, MAX_EXPANDED_BYTES of
keys and scalars, or MAX_DEPTH levels (a recursive anchor, `a: &a {b: *a}`, is an endless chain:
without the depth limit its key paths alone grow as depth^2, 7 GB in 15 s).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from grok_deploy.errors import UserError

MAX_FILE_BYTES = 1 << 20     # a pipeline.yaml is a few KB; /dev/zero or a 4 GB file is refused unread
MAX_NODES = 100_000          # YAML nodes after alias expansion (a "billion laughs" file has 10^9)
MAX_EXPANDED_BYTES = 2 * MAX_FILE_BYTES  # keys + scalars after alias expansion
MAX_DEPTH = 32               # nesting levels (sections are 2-3 deep; a recursive anchor is endless)
MAX_INT_DIGITS = 30


def line_of(lines: dict, loc: tuple) -> int:
    """Line of the longest prefix of `loc` that the file spells out (1 for the document)."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return lines.get((), 1)


def _node_lines(root, lines: dict, file: Path) -> None:
    """Fill {key path: line} walking the node tree without recursion; aliases are walked where
    they are used, so the walk counts the expanded document and stops at MAX_NODES values,
    MAX_EXPANDED_BYTES or MAX_DEPTH levels (each bounds the memory and time of what follows)."""
    todo, seen_nodes, seen_bytes = [(root, ())], 0, 0
    while todo:
        node, path = todo.pop()
        seen_nodes += 1
        if seen_nodes > MAX_NODES:
            raise UserError(f"{file.name}: more than {MAX_NODES} YAML values once anchors and aliases are expanded "
                            "(a pipeline file is a few dozen); remove the repeated aliases")
        if len(path) > MAX_DEPTH:
            line = node.start_mark.line + 1
            raise UserError(f"{file.name} line {line}: nested more than {MAX_DEPTH} levels deep once aliases are "
                            "expanded (sections are 2-3 levels; an anchor used inside itself never ends); "
                            "remove the alias or flatten it")
        if isinstance(node, yaml.ScalarNode):
            seen_bytes += len(node.value)
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value in node.value:
                key = key_node.value
                if not isinstance(key, str):
                    raise UserError(f"{file.name} line {key_node.start_mark.line + 1}: "
                                    f"{'.'.join(map(str, path)) or '(document)'}: keys must be plain names")
                if key in seen:
                    raise UserError(f"{file.name} line {key_node.start_mark.line + 1}: "
                                    f"{'.'.join(map(str, path + (key,)))}: duplicate key; keep one")
                seen.add(key)
                seen_bytes += len(key)
                lines.setdefault(path + (key,), key_node.start_mark.line + 1)
                todo.append((value, path + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault(path + (i,), item.start_mark.line + 1)
                todo.append((item, path + (i,)))
        if seen_bytes > MAX_EXPANDED_BYTES:
            raise UserError(f"{file.name}: more than {MAX_EXPANDED_BYTES} bytes of keys and values once anchors "
                            "and aliases are expanded (a pipeline file is a few KB); remove the repeated aliases")


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses integers too long to be a setting (Python refuses to print ints of
    over 4300 digits, and no key needs more than a few)."""

    def construct_yaml_int(self, node):
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {digits} digits is too large",
                                                    node.start_mark)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def read_text_bounded(file: Path, what: str = "pipeline file", limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; UserError for anything else
    (a folder, a FIFO or a device is refused before it is read, so nothing blocks or fills memory)."""
    hint = "pass an existing pipeline.yaml" if what == "pipeline file" else f"pass a readable {what}"
    try:
        st = os.stat(file)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
            raise UserError(f"{file}: the {what} is {kind}; {hint}")
        if st.st_size > limit:
            raise UserError(f"{file}: the {what} is {st.st_size} bytes, more than the {limit} allowed; {hint}")
        with open(file, "rb", opener=lambda p, fl: os.open(p, fl | os.O_NONBLOCK)) as f:
            data = f.read(limit + 1)
    except OSError as e:
        why = "a symlink loop" if e.errno == errno.ELOOP else e.strerror
        raise UserError(f"{file}: cannot read the {what} ({why}); {hint}") from None
    if len(data) > limit:
        raise UserError(f"{file}: the {what} is more than {limit} bytes; {hint}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{file.name} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def read_yaml(file: Path) -> tuple[Any, dict]:
    """The document and {key path tuple: 1-based line}."""
    text = read_text_bounded(file)
    loader = None
    try:
        loader = _Loader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        lines: dict = {(): 1}
        if node is not None:
            _node_lines(node, lines, file)
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        if isinstance(e, yaml.reader.ReaderError):
            line = text[:e.position].count("\n") + 1
            raise UserError(f"{file.name} line {line}: character U+{e.character:04X} is not allowed in YAML "
                            "(control characters such as NUL); remove it") from None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{file.name} line {line}: YAML syntax: {problem}") from None
    except RecursionError:
        raise UserError(f"{file.name}: nested too deeply for a pipeline file (sections are 2-3 levels); "
                        "flatten it") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines
