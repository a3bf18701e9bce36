"""Reading and writing ``.safetensors`` (and small JSON) files safely: clear errors, atomic writes.

Every file ``formats/`` reads or writes goes through here. Owns: refusing pickles (never
``torch.load`` a user's file), turning safetensors' terse errors for truncated or corrupt
files into messages that name the file, the finiteness check before anything is written,
the check of an adapter's tensors when it is read (:func:`check_adapter_tensors`), and
write-to-temp-then-rename (DESIGN §10): a write that fails for any reason leaves no
temporary and no folder it created, and one that runs out of space raises
:class:`~dorabooth.diskfull.DiskFull` naming the file it was writing.

Whole models are read and written one tensor at a time (:class:`SafetensorsReader`,
:func:`write_safetensors_streaming`) with plain file reads and writes: a memory-mapped file's
pages count in the process's resident memory until it is closed, so mapping a 5 GB UNet to
read it would cost 5 GB of RSS however little of it is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import takewhile
from pathlib import Path

import torch
from safetensors import safe_open

from .. import diskfull, faults

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_HEADER = 100 * 2**20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_CHUNK = 1 << 30                 # bytes per read/write call (Linux moves at most ~2 GiB per call)


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


class SafetensorsReader(Mapping):
    """A ``.safetensors`` file as a read-only mapping ``{name: tensor}`` whose values are read
    from disk when asked for (plain reads, never mapped; each read is a new tensor in the
    stored dtype). ``dtype(name)``/``shape(name)`` come from the header alone; ``metadata`` is
    the header's ``__metadata__``. Use it as a context manager or ``close()`` it."""

    def __init__(self, path: str | os.PathLike, what: str = "file"):
        self.path = check_readable(path, what)
        self.what = what
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._start = 8 + n
        self._entries = {}
        for name, spec in header.items():
            if spec.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: {name} has dtype {spec.get('dtype')!r}, which dorabooth does not read")
            self._entries[name] = (DTYPES[spec["dtype"]], tuple(spec["shape"]), *spec["data_offsets"])
        self._file = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, end = self._entries[name]
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        data = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(data.numpy())
        self._file.seek(self._start + begin)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:done + _CHUNK])
            if not got:
                raise ValueError(f"{self.path}: truncated while reading {name}; download or copy it again")
            done += got
        return data.view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def write_safetensors_streaming(path: str | os.PathLike, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                                tensor_of: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None,
                                *, overwrite: bool = True, where: str | None = None) -> Path:
    """A ``.safetensors`` file written one tensor at a time: ``entries`` (name, dtype, shape)
    make the header, then ``tensor_of(name)`` gives each tensor, which must have that dtype
    and shape and be finite; only one is held at a time. Written to a temporary sibling and
    renamed when complete, so an error (a NaN, a wrong shape) leaves nothing behind."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --out or pass --overwrite")
    where = where or str(target)
    # larger items first, then by name (as safetensors' own writer), so every tensor stays aligned;
    # metadata sorted too: the same tensors and metadata always give the same bytes
    order = sorted(entries, key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0]))
    header: dict = {"__metadata__": dict(sorted((str(k), str(v)) for k, v in metadata.items()))} if metadata else {}
    offset = 0
    for name, dtype, shape in order:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_file(target, needs=8 + len(raw) + offset) as tmp, open(tmp, "wb", buffering=0) as f:
        _write_all(f, struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in order:
            t = tensor_of(name).detach().to("cpu")
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{where}: {name} is {tuple(t.shape)} {t.dtype}, the header says {tuple(shape)} "
                                 f"{dtype}")
            check_finite({name: t}, where)
            _write_all(f, t.contiguous().reshape(-1).view(torch.uint8).numpy())
            del t
    return target


def _write_all(f, data) -> None:
    """All of ``data`` through the unbuffered file ``f``: a raw write may write less than asked
    (a disk filling up), and the next call then raises the reason."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view[:_CHUNK]):]


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


FP16_MAX = float(torch.finfo(torch.float16).max)     # 65504
DAMAGED = "the file is damaged or its training diverged — use an earlier checkpoint"


def check_adapter_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise, naming ``source`` and the first bad tensor (by name), unless every adapter tensor is
    floating point, finite and within the fp16 range (|x| <= 65504).

    The bound: adapters circulate and are applied in fp16, so a larger value cannot come from
    a working adapter (trained A, B and magnitudes are O(1)-O(100)); it overflows to inf/NaN
    downstream (a ×1e30 magnitude gives black images). A kohya ``alpha`` may be an integer."""
    bad = []
    for key in sorted(tensors):
        t = tensors[key]
        if not t.is_floating_point():
            if key.endswith(".alpha") and t.numel() == 1:
                continue
            raise ValueError(f"{source}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}; adapter weights "
                             f"are floating point (fp16, bf16 or fp32): the file is damaged or not an adapter")
        if t.numel() == 0:
            continue
        x = t.detach().float()
        if torch.isnan(x).any():
            bad.append((key, "has NaN values"))
        elif torch.isinf(x).any():
            bad.append((key, "has infinite values"))
        elif (peak := float(x.abs().max())) > FP16_MAX:
            bad.append((key, f"has values up to {peak:.3g}, beyond the fp16 range (65504) no working adapter leaves"))
    if bad:
        key, what = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(f"{source}: tensor {key!r} {what}{more}; {DAMAGED}")


def temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


@contextmanager
def made_folders(path: str | os.PathLike) -> Iterator[Path]:
    """``mkdir -p path``; when the block fails, the folders this made are removed again (those
    still empty: a folder that existed before, or that another writer filled, stays)."""
    folder = Path(path)
    missing = list(takewhile(lambda p: not p.exists(), (folder, *folder.parents)))      # nearest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for p in missing:
            try:
                p.rmdir()
            except OSError:
                break
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, *, needs: int | None = None):
    """Yield a temporary sibling of ``path`` to write; on success it is renamed onto ``path``
    (readers never see a half-written file). On any error (raised by the block, or by closing,
    flushing or renaming) the temporary and the folders made for ``path`` are removed; running
    out of space raises :class:`~dorabooth.diskfull.DiskFull` naming ``path`` (``needs``: its size
    in bytes, when known)."""
    target = Path(path)
    tmp = temp_sibling(target)
    with made_folders(target.parent), diskfull.naming(target, needs):
        try:
            yield tmp
            faults.reach("rename", target)
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
    """Check finiteness, write to a temporary sibling, then rename onto ``path``.

    Byte-reproducible: the header is written here (:func:`write_safetensors_streaming`), not by
    safetensors' ``save_file``, whose metadata order changes from one call to the next."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --out or pass --overwrite")
    check_finite(tensors, str(target))
    out = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    return write_safetensors_streaming(target, [(k, t.dtype, tuple(t.shape)) for k, t in out.items()],
                                       out.__getitem__, metadata or {})


def header_date() -> str:
    """``modelspec.date`` of a file written now (local time); with ``SOURCE_DATE_EPOCH`` set (the
    reproducible-builds convention) that moment in UTC, so a rewrite gives the same bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(epoch)))
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"SOURCE_DATE_EPOCH={epoch!r}: not a number of seconds since 1970; unset it or give "
                         f"one, e.g. SOURCE_DATE_EPOCH=$(date +%s)") from None


@contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary folder next to ``path``; on success it is renamed onto ``path``.

    On an error the temporary folder and the folders made for ``path`` are removed and an
    existing ``path`` is left untouched; running out of space raises
    :class:`~dorabooth.diskfull.DiskFull` naming the file as it would have been in ``path``.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --out or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    with made_folders(target.parent):
        try:
            with diskfull.naming(target, within=tmp):
                tmp.mkdir()
                yield tmp
                if target.exists():
                    old = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.replace(target, old)
                    os.replace(tmp, target)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, target)
        except diskfull.DiskFull as e:
            raise e.carry_on(e.way_out, path=_outside(e.path, tmp, target)) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _outside(path: Path, tmp: Path, target: Path) -> Path:
    """``path`` inside the temporary folder ``tmp`` as it will be named in ``target``."""
    return target / path.relative_to(tmp) if path.is_relative_to(tmp) else path
