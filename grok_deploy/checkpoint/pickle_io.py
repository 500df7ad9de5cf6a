"""Pickles of the official checkpoint, read without executing them and written opcode by opcode.

A release file is one protocol-4 pickle of a float32 ndarray or of a `__main__.QuantizedWeight8bit`
(xai-checkpoint-format.md §2). `scan(path)` walks the opcodes itself (it never calls pickle.load),
allows only the globals of §7, and returns where each array's payload lies in the file, so that a
reader can memory-map it. Shapes and dtypes precede the payloads, so a scan reads only a few KiB.
The scan streams: payloads are skipped unread, and at most MAX_OPCODE_BYTES of opcodes are walked
(a release file has ~300 bytes of them), so its memory is bounded whatever the file holds (a 20 MB
file of `}` opcodes used to build 20 M dicts: 1.37 GB).
`dump(f, obj)` writes the same structure the original loader reads.
"""
from __future__ import annotations

import errno
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from grok_deploy.errors import UserError

BF16 = np.dtype(ml_dtypes.bfloat16)
QW8_GLOBAL = ("__main__", "QuantizedWeight8bit")
_RECONSTRUCT, _NDARRAY, _DTYPE, _BFLOAT16 = "reconstruct", "ndarray", "dtype", "bfloat16"
ALLOWED_GLOBALS = {  # (module, name) -> role; anything else is refused before it could run
    QW8_GLOBAL: "qw8",
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,  # what ml_dtypes 0.5 records
    ("ml_dtypes._ml_dtypes_ext", "bfloat16"): _BFLOAT16,
}
_NUMERIC_DESCR = {f"{k}{n}" for k, ns in (("f", (2, 4, 8)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)))
                  for n in ns} | {"b1"}
_MAX_STR = 4096
_CHUNK = 4096
# Opcodes and their arguments, payloads excluded. Each opcode byte makes at most ~100 bytes of
# Python objects (an empty dict, a memo entry), so a scan holds under 10 MB.
MAX_OPCODE_BYTES = 64 << 10


@dataclass(frozen=True)
class ArrayRef:
    """Where one array's bytes lie in a pickle file (nothing is read until `load`)."""

    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    fortran: bool = False

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        """A read-only memory map of the whole array."""
        if self.nbytes == 0:
            return np.empty(self.shape, self.dtype)
        return np.memmap(self.file, self.dtype, "r", self.offset, self.shape, "F" if self.fortran else "C")

    def load_index(self, i: int) -> np.ndarray:
        """A read-only memory map of `array[i]`, touching only its bytes (C order)."""
        if self.fortran:
            return self.load()[i]
        sub = self.shape[1:]
        if self._step() == 0:
            return np.empty(sub, self.dtype)
        return np.memmap(self.file, self.dtype, "r", self.offset + i * self._step(), sub)

    def read(self, i: int | None = None) -> np.ndarray:
        """A new array holding the whole array, or `array[i]`, read straight into it (no mapping)."""
        if self.fortran:
            return np.array(self.load() if i is None else self.load()[i])
        shape = self.shape if i is None else self.shape[1:]
        buf = np.empty(self.nbytes if i is None else self._step(), np.uint8)
        with _open_raw(self.file) as f:
            f.seek(self.offset + (0 if i is None else i * self._step()))
            view, done = memoryview(buf), 0
            while done < len(buf):
                n = f.readinto(view[done:])
                if not n:
                    raise UserError(f"{self.file}: truncated; download this file again")
                done += n
        return buf.view(self.dtype).reshape(shape)

    def _step(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class QW8Ref:
    """A pickled QuantizedWeight8bit: its two arrays."""

    weight: ArrayRef
    scales: ArrayRef


# --- reading: a small stack machine over symbolic values --------------------------------------

class _Bytes:
    def __init__(self, offset: int, size: int):
        self.offset, self.size = offset, size


class _Global:
    def __init__(self, role: str):
        self.role = role


class _Array:
    state = None


class _Dtype:
    def __init__(self, dtype: np.dtype):
        self.dtype, self.built = dtype, False


class _QW8:
    state = None


class _Truncated(Exception):
    pass


class _Stream:
    """Reads opcodes from a file in small chunks; `skip` jumps over a payload without reading it."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0
        self.buf, self.buf_start = b"", 0
        self.skipped = 0  # payload bytes jumped over

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.size:
            raise _Truncated
        if not (self.buf_start <= self.pos and end <= self.buf_start + len(self.buf)):
            self.f.seek(self.pos)
            self.buf, self.buf_start = self.f.read(max(n, _CHUNK)), self.pos
        i = self.pos - self.buf_start
        self.pos = end
        return self.buf[i:i + n]

    def skip(self, n: int) -> int:
        start = self.pos
        if start + n > self.size:
            raise _Truncated
        self.pos += n
        self.skipped += n
        return start

    def line(self) -> str:
        out = b""
        while not out.endswith(b"\n"):
            out += self.read(1)
            if len(out) > _MAX_STR:
                raise ValueError("text line too long")
        return out[:-1].decode("ascii")


def _open_raw(path: Path):
    """Open a regular file for reading; a folder, FIFO or device is refused before any read
    (O_NONBLOCK: opening a FIFO does not wait for a writer)."""
    f = open(path, "rb", buffering=0, opener=lambda p, fl: os.open(p, fl | os.O_NONBLOCK))
    mode = os.fstat(f.fileno()).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise _NotRegular("a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)")
    return f


class _NotRegular(Exception):
    pass


def scan(path) -> ArrayRef | QW8Ref:
    """Walk the pickle in `path` and return where its arrays lie. Never executes the pickle.

    Raises UserError naming the file for a refused global, an unsupported construct, a wrong or
    object dtype, or a truncated file.
    """
    path = Path(path)
    try:
        with _open_raw(path) as f:
            size = os.fstat(f.fileno()).st_size
            return _walk(_Stream(f, size), path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the checkpoint is incomplete, download this file again") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a tensor file; remove it and download the file again") from None
    except _NotRegular as e:
        raise UserError(f"{path}: is {e}, not a tensor file; put the downloaded file there") from None
    except OSError as e:
        why = "a symlink loop" if e.errno == errno.ELOOP else e.strerror
        raise UserError(f"{path}: cannot be read ({why}); put the downloaded file there") from None
    except _Truncated:
        raise UserError(f"{path}: truncated ({size} bytes); download this file again") from None
    except (ValueError, IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError, OverflowError,
            MemoryError, RecursionError) as e:
        raise UserError(f"{path}: not a Grok-1 checkpoint tensor pickle ({e}); refusing to load it") from None


def _walk(s: _Stream, path: Path) -> ArrayRef | QW8Ref:
    stack: list = []
    marks: list[list] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    def unsigned(n: int) -> int:
        return int.from_bytes(s.read(n), "little")

    while True:
        if s.pos - s.skipped > MAX_OPCODE_BYTES:
            raise ValueError(f"more than {MAX_OPCODE_BYTES} bytes of pickle opcodes besides the array payloads, "
                             "where a checkpoint tensor has a few hundred")
        op = s.read(1)
        if op == b"\x80":  # PROTO
            if s.read(1)[0] > 5:
                raise ValueError("unknown pickle protocol")
        elif op == b"\x95":  # FRAME: framing is only a hint for buffering
            s.read(8)
        elif op == b".":  # STOP
            if len(stack) != 1 or marks:
                raise ValueError("pickle does not hold exactly one object")
            return _result(stack[0], path)
        elif op == b"(":  # MARK
            marks.append(stack)
            stack = []
        elif op == b")":
            stack.append(())
        elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
            n = op[0] - 0x84
            if len(stack) < n:
                raise ValueError("stack underflow")
            items = tuple(stack[len(stack) - n:])
            del stack[len(stack) - n:]
            stack.append(items)
        elif op == b"t":  # TUPLE
            items = pop_mark()  # rebinds `stack` to the outer list
            stack.append(tuple(items))
        elif op == b"}":
            stack.append({})
        elif op in (b"s", b"u"):  # SETITEM, SETITEMS
            if op == b"s":
                if len(stack) < 3:
                    raise ValueError("stack underflow")
                items = stack[-2:]
                del stack[-2:]
            else:
                items = pop_mark()
            target = stack[-1]
            if not isinstance(target, dict) or len(items) % 2:
                raise ValueError("bad SETITEMS")
            for k, v in zip(items[::2], items[1::2]):
                if not isinstance(k, str):
                    raise ValueError("non-string dict key")
                target[k] = v
        elif op == b"N":
            stack.append(None)
        elif op in (b"\x88", b"\x89"):
            stack.append(op == b"\x88")
        elif op == b"K":
            stack.append(unsigned(1))
        elif op == b"M":
            stack.append(unsigned(2))
        elif op == b"J":
            stack.append(struct.unpack("<i", s.read(4))[0])
        elif op == b"\x8a":  # LONG1
            stack.append(int.from_bytes(s.read(unsigned(1)), "little", signed=True))
        elif op in (b"\x8c", b"X", b"\x8d"):  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            n = unsigned({b"\x8c": 1, b"X": 4, b"\x8d": 8}[op])
            if n > _MAX_STR:
                raise ValueError("string too long")
            stack.append(s.read(n).decode("utf-8"))
        elif op in (b"C", b"B", b"\x8e"):  # SHORT_BINBYTES, BINBYTES, BINBYTES8: skipped, not read
            n = unsigned({b"C": 1, b"B": 4, b"\x8e": 8}[op])
            stack.append(_Bytes(s.skip(n), n))
        elif op == b"\x94":  # MEMOIZE
            memo[len(memo)] = stack[-1]
        elif op in (b"q", b"r"):  # BINPUT, LONG_BINPUT
            memo[unsigned(1 if op == b"q" else 4)] = stack[-1]
        elif op in (b"h", b"j"):  # BINGET, LONG_BINGET
            stack.append(memo[unsigned(1 if op == b"h" else 4)])
        elif op in (b"\x93", b"c"):  # STACK_GLOBAL, GLOBAL
            if op == b"c":
                module, name = s.line(), s.line()
            else:
                module, name = stack.pop(-2), stack.pop()
            stack.append(_global(module, name, path))
        elif op == b"R":  # REDUCE
            args = stack.pop()
            stack[-1] = _reduce(stack[-1], args)
        elif op == b"\x81":  # NEWOBJ
            args = stack.pop()
            cls = stack[-1]
            if not (isinstance(cls, _Global) and cls.role == "qw8" and args == ()):
                raise ValueError("unexpected object construction")
            stack[-1] = _QW8()
        elif op == b"b":  # BUILD
            state = stack.pop()
            _build(stack[-1], state)
        else:
            raise ValueError(f"unsupported pickle opcode {op!r} at byte {s.pos - 1}")


def _global(module, name, path: Path) -> _Global:
    role = ALLOWED_GLOBALS.get((module, name))
    if role is None:
        raise UserError(f"{path}: refused pickle global '{module}.{name}'; a checkpoint tensor may only "
                        "reference numpy arrays, bfloat16 and __main__.QuantizedWeight8bit. "
                        "Nothing from this file was run or loaded")
    return _Global(role)


def _reduce(func, args):
    role = func.role if isinstance(func, _Global) else None
    if role == _RECONSTRUCT:
        if not (len(args) == 3 and getattr(args[0], "role", None) == _NDARRAY and isinstance(args[2], _Bytes)):
            raise ValueError("unexpected _reconstruct arguments")
        return _Array()
    if role == _DTYPE:
        if len(args) != 3:
            raise ValueError("unexpected dtype arguments")
        descr = args[0]
        if isinstance(descr, _Global) and descr.role == _BFLOAT16:
            return _Dtype(BF16)
        if not isinstance(descr, str):  # a hostile one (a 60k-deep tuple) is neither hashed nor printed
            raise ValueError("unexpected dtype descriptor")
        if descr in ("O4", "O8", "O"):
            raise ValueError("object dtype refused")
        if descr not in _NUMERIC_DESCR:
            raise ValueError(f"dtype {descr!r} refused")
        return _Dtype(np.dtype(descr))
    raise ValueError("unexpected call")


def _build(target, state) -> None:
    if isinstance(target, _Dtype) and not target.built:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise ValueError("unexpected dtype state")
        if state[1] not in ("<", "|", "="):
            raise ValueError(f"byte order {state[1]!r} refused (only little-endian)")
        if any(x is not None for x in state[2:5]) or (len(state) == 9 and state[8] is not None):
            raise ValueError("structured dtype refused")
        target.built = True
    elif isinstance(target, _Array) and target.state is None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise ValueError("unexpected array state")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise ValueError("bad array shape")
        if not (isinstance(dtype, _Dtype) and dtype.built and isinstance(fortran, bool) and isinstance(data, _Bytes)):
            raise ValueError("bad array state")
        if len(shape) > 8:
            raise ValueError(f"{len(shape)} dimensions")
        if data.size != math.prod(shape) * dtype.dtype.itemsize:  # Python ints: a 2^70 shape cannot wrap
            raise ValueError(f"payload of {data.size} bytes does not fit shape {shape} {dtype.dtype}")
        target.state = (shape, dtype.dtype, fortran, data.offset)
    elif isinstance(target, _QW8) and target.state is None:
        if not (isinstance(state, dict) and set(state) == {"weight", "scales"}):
            raise ValueError("QuantizedWeight8bit state must be exactly {weight, scales}")
        target.state = state
    else:
        raise ValueError("unexpected BUILD")


def _result(obj, path: Path) -> ArrayRef | QW8Ref:
    def array(a) -> ArrayRef:
        if not (isinstance(a, _Array) and a.state is not None):
            raise ValueError("incomplete array")
        shape, dtype, fortran, offset = a.state
        return ArrayRef(path, shape, dtype, offset, fortran)

    if isinstance(obj, _QW8) and obj.state is not None:
        return QW8Ref(array(obj.state["weight"]), array(obj.state["scales"]))
    return array(obj)


# --- writing ------------------------------------------------------------------------------------

def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"\x8c" + bytes([len(b)]) + b if len(b) < 256 else b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raise ValueError(f"integer {n} too large for a shape")


def _tuple(items: list[bytes]) -> bytes:
    if not items:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + bytes([0x84 + len(items)])
    return b"(" + b"".join(items) + b"t"


def _glob(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"


_NONE3 = b"NNN"
# What numpy 1.26 pickles for each dtype: descr, then the (3, byteorder, None, None, None,
# elsize, alignment, flags) state.
_DTYPES = {
    np.dtype(np.float32): (_str("f4"), b"\x8c\x01<", -1, -1, 0),
    np.dtype(np.int8): (_str("i1"), b"\x8c\x01|", -1, -1, 0),
    BF16: (_glob("ml_dtypes", "bfloat16"), b"\x8c\x01<", 2, 2, 64),
}


def _dtype(dt: np.dtype) -> bytes:
    if dt not in _DTYPES:
        raise ValueError(f"cannot write dtype {dt}; the release uses float32, int8 and bfloat16")
    descr, order, elsize, align, flags = _DTYPES[dt]
    state = b"(" + _int(3) + order + _NONE3 + _int(elsize) + _int(align) + _int(flags) + b"t"
    return _glob("numpy", "dtype") + descr + b"\x89\x88\x87R" + state + b"b"


def _bytes_header(n: int) -> bytes:
    if n < 256:
        return b"C" + bytes([n])
    if n < 2 ** 32:
        return b"B" + struct.pack("<I", n)
    return b"\x8e" + struct.pack("<Q", n)


def _dump_array(f, a: np.ndarray) -> None:
    # _reconstruct(ndarray, (0,), b'b'), then BUILD (1, shape, dtype, False, raw bytes)
    a = np.ascontiguousarray(a)
    head = (_glob("numpy.core.multiarray", "_reconstruct") + _glob("numpy", "ndarray")
            + _int(0) + b"\x85" + b"C\x01b" + b"\x87R")
    state = b"(" + _int(1) + _tuple([_int(n) for n in a.shape]) + _dtype(a.dtype) + b"\x89"
    f.write(head + state + _bytes_header(a.nbytes))
    if a.nbytes:
        f.write(a.reshape(-1).view(np.uint8).data)
    f.write(b"tb")


def dump(f, obj) -> None:
    """Write `obj` (an ndarray, or anything with `.weight` and `.scales`) as one protocol-4 pickle.

    A quantised weight is written as `__main__.QuantizedWeight8bit` (NEWOBJ, then BUILD with the
    state dict {weight, scales}); arrays use numpy 1.x's `numpy.core.multiarray._reconstruct`.
    The payload is written straight from the array's memory; the bytes depend only on `obj`.
    """
    f.write(b"\x80\x04")
    if isinstance(obj, np.ndarray):
        _dump_array(f, obj)
    else:
        f.write(_glob(*QW8_GLOBAL) + b")\x81}(" + _str("weight"))
        _dump_array(f, obj.weight)
        f.write(_str("scales"))
        _dump_array(f, obj.scales)
        f.write(b"ub")
    f.write(b".")
