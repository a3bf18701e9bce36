"""Reading and writing ``.safetensors`` (and small JSON) files safely: clear errors, atomic writes.

Every file ``formats/`` reads or writes goes through here. Owns: refusing pickles (never
``torch.load`` a user's file), turning safetensors' terse errors for truncated or corrupt
files into messages that name the file, the finiteness check before anything is written,
and write-to-temp-then-rename (DESIGN §10).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_HEADER = 100 * 2**20


def check_readable(path: str | os.PathLike, what: str = "file") -> Path:
    """The path as a ``Path`` if it is an existing ``.safetensors`` file whose header parses.

    Raises ``FileNotFoundError``/``ValueError`` naming the file and what to do instead.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such {what}")
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a folder; pass the {what} (.safetensors) itself")
    pickle_msg = (f"{p}: a pickle-based checkpoint; dorabooth reads only .safetensors, because opening a "
                  f"pickle can run code. Convert it with a tool you trust first.")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(pickle_msg)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        looks_pickled = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        if len(head) < 8:
            raise ValueError(f"{p}: empty or truncated ({size} bytes); not a .safetensors {what}")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            if looks_pickled:
                raise ValueError(pickle_msg)
            raise ValueError(f"{p}: not a valid .safetensors {what} (header length {n} does not fit the "
                             f"{size}-byte file: truncated download or another file type)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if looks_pickled:
                raise ValueError(pickle_msg) from None
            raise ValueError(f"{p}: corrupt .safetensors header ({e})") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{p}: truncated .safetensors {what}: its header describes {8 + n + end} bytes "
                         f"but the file has {size}; download or copy it again")
    return p


def read_metadata(path: str | os.PathLike, what: str = "file") -> tuple[list[str], dict[str, str]]:
    """(tensor names, header metadata) without reading any tensor."""
    p = check_readable(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{p}: not a readable .safetensors {what} ({e})") from e


def tensor_shapes(path: str | os.PathLike, what: str = "file") -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the header alone (no tensor read)."""
    p = check_readable(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{p}: not a readable .safetensors {what} ({e})") from e


def read_tensor(path: str | os.PathLike, names: Iterable[str], what: str = "file") -> torch.Tensor | None:
    """The first of ``names`` the file holds (one tensor read), or None when it holds none of them."""
    p = check_readable(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = set(f.keys())
            name = next((n for n in names if n in keys), None)
            return None if name is None else f.get_tensor(name)
    except Exception as e:
        raise ValueError(f"{p}: not a readable .safetensors {what} ({e})") from e


def read_safetensors(path: str | os.PathLike, what: str = "file",
                     keys: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a ``.safetensors`` file; ``keys`` limits what is read."""
    p = check_readable(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = list(f.keys()) if keys is None else list(keys)
            return {k: f.get_tensor(k) for k in names}, meta
    except Exception as e:
        raise ValueError(f"{p}: not a readable .safetensors {what} ({e})") from e


def read_json(path: str | os.PathLike, what: str = "file"):
    """The parsed JSON of a small text file (a config next to an adapter or in a run folder)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such {what}")
    try:
        return json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise naming the first tensor holding NaN or inf (checked in the dtype to be written)."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {key} is not finite (NaN/inf) in {str(t.dtype).removeprefix('torch.')}; "
                             f"nothing was written. A strength too large, a broken adapter, or fp16 overflow "
                             f"(try --dtype bf16 or fp32)")


def temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary sibling of ``path`` to write; on success it is renamed onto ``path``
    (readers never see a half-written file), on an error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data, *, indent: int | None = 1, **dumps) -> Path:
    """``data`` as JSON (plus a final newline), written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, **dumps) + "\n", encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = True) -> Path:
    """Check finiteness, write to a temporary sibling, then rename onto ``path``."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --out or pass --overwrite")
    check_finite(tensors, str(target))
    out = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        save_file(out, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return target


@contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary folder next to ``path``; on success it is renamed onto ``path``.

    On an error the temporary folder is removed and an existing ``path`` is left untouched.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --out or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
