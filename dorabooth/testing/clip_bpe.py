"""CLIP's real BPE tokenizer files, from a registry package, never from a model hub.

OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (the merges CLIP, SD 1.x/2.x and SDXL were
trained with) ships inside the ``open_clip_torch`` wheel. :func:`bpe_file` takes it from an
installed ``open_clip``, else from ``pip download --no-deps`` of the wheel (its dependencies,
torchvision among them, are never installed), and checks its SHA-256. :func:`convert` is the
recipe of OpenAI CLIP's ``simple_tokenizer.py`` that transformers' CLIP files follow::

    merges = lines[1 : 49152 - 256 - 2 + 1]                    # 48,894 merges
    vocab  = bytes_to_unicode() values (256)  +  each + "</w>" (256)
             + "".join(merge) for each merge  +  <|startoftext|>, <|endoftext|>   # 49,408

:func:`write_tokenizer` writes ``vocab.json``, ``merges.txt`` (``#version: 0.2`` header, as
the published SD folders), ``tokenizer_config.json`` and ``special_tokens_map.json`` with
the family's pad token (SD 1.x and SDXL's first tokenizer pad with ``<|endoftext|>``,
SD 2.x and SDXL's ``tokenizer_2`` with ``!``, id 0).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..toyworld.tokenizer import bytes_to_unicode

PACKAGE = "open_clip_torch"                        # the registry package that ships the file
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"  # its path inside the wheel
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"   # OpenAI CLIP's file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2                       # 48,894


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _from_installed_open_clip() -> bytes | None:
    spec = importlib.util.find_spec("open_clip")      # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / BPE_NAME
        if path.is_file():
            return path.read_bytes()
    return None


def _from_wheel(download_dir: Path) -> bytes:
    """``pip download --no-deps`` the wheel (kept in ``download_dir``) and read the file out of it."""
    wheels = sorted(download_dir.glob("open_clip_torch-*.whl"))
    if not wheels:
        download_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "-q", PACKAGE, "-d", str(download_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(download_dir.glob("open_clip_torch-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise OSError(f"could not get CLIP's BPE file: `{' '.join(cmd[2:])}` failed "
                          f"({(proc.stderr or proc.stdout).strip()[-400:]}). Install or download {PACKAGE} "
                          f"(pip download --no-deps {PACKAGE} -d {download_dir}) and run again")
    with zipfile.ZipFile(wheels[-1]) as z:
        try:
            return z.read(MEMBER)
        except KeyError:
            raise OSError(f"{wheels[-1]} has no {MEMBER}; remove it and run again") from None


def bpe_file(cache: str | os.PathLike) -> Path:
    """``<cache>/bpe_simple_vocab_16e6.txt.gz``, fetched once (installed open_clip, else the
    wheel from the registry) and checked against OpenAI's SHA-256."""
    cache = Path(cache)
    path = cache / BPE_NAME
    if path.is_file() and _sha256(path.read_bytes()) == BPE_SHA256:
        return path
    data = _from_installed_open_clip() or _from_wheel(cache / "downloads")
    if _sha256(data) != BPE_SHA256:
        raise OSError(f"{PACKAGE}'s {BPE_NAME} has SHA-256 {_sha256(data)}, not OpenAI CLIP's {BPE_SHA256}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def convert(bpe_gz: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """(vocab token → id, merges as "a b" lines) from the gzipped BPE file, by OpenAI's recipe."""
    lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]                  # line 0 is the version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_gz}: the recipe gave {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def clip_files(cache: str | os.PathLike) -> Path:
    """``<cache>/clip-bpe/`` holding the converted ``vocab.json`` and ``merges.txt`` (made once)."""
    out = Path(cache) / "clip-bpe"
    if (out / "vocab.json").is_file() and (out / "merges.txt").is_file():
        return out
    vocab, merges = convert(bpe_file(cache))
    tmp = Path(tempfile.mkdtemp(prefix="clip-bpe.", dir=cache))
    tmp.chmod(0o755)
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def write_tokenizer(folder: str | os.PathLike, cache: str | os.PathLike, *, pad_token: str) -> Path:
    """A CLIPTokenizer folder (model_max_length 77) with the real vocabulary and ``pad_token``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = clip_files(cache)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, folder / name)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder
