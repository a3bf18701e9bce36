"""Pivotal tuning: new token embeddings trained beside the adapter (``--pivotal N``).

As diffusers' advanced SDXL script and LoRA Ease do it: N new tokens ``<s0>…<sN-1>`` are
added to every tokenizer, each text encoder gets N new embedding rows, and the instance prompt
names the subject with them instead of the rare token ("a photo of <s0><s1> dog").

While training, each encoder's ``token_embedding`` keeps its whole weight frozen; the N rows
that train are a separate parameter ``pivotal_rows`` (N, dim) on it, spliced in by a forward
hook where the ids are new tokens. So no other row can change (nothing else has a gradient or
weight decay) and the optimizer holds state for N × dim numbers, not the whole vocabulary.

Outside training the tokens are loaded the stock way (``tokenizer.add_tokens``, the embedding
matrix resized, the rows written in), as ``pipe.load_textual_inversion`` does; :func:`remove`
restores the original tokenizers and matrices exactly.

The embeddings file is what A1111 and ComfyUI load from their ``embeddings`` folder and what
diffusers' advanced script writes: one (N, dim) tensor per encoder under ``clip_l`` (and
``clip_g`` for SDXL; ``clip_h`` for SD 2.x, ComfyUI's key for OpenCLIP-H), with the token names in
the header (``dorabooth.tokens``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .config import pivotal_identifier
from .families import Family, detect_family
from .formats.files import read_safetensors, write_safetensors

EMBEDDINGS = "embeddings.safetensors"           # beside adapter.safetensors in a run and its checkpoints
EXPORT_SUFFIX = "_emb.safetensors"              # beside an exported file: <name>_emb (diffusers' advanced script)
ENCODER_KEYS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
TOKENIZERS = ("tokenizer", "tokenizer_2")
ROWS = "pivotal_rows"                           # the trainable (N, dim) parameter on each token_embedding
_ORIGINAL = "_dorabooth_pivotal"                # on the pipe: the tokenizers and row counts before tokens were added
_IDENTIFIER = re.compile(r"(<s\d+>)+")


def token_names(n: int) -> list[str]:
    """``["<s0>", "<s1>", …]``: the names diffusers' advanced script gives its new tokens."""
    return tokens_of(pivotal_identifier(n))


def is_identifier(token: str | None) -> bool:
    """True for a pivotal identifier such as ``"<s0><s1>"``."""
    return bool(token) and _IDENTIFIER.fullmatch(token) is not None


def tokens_of(identifier: str) -> list[str]:
    return re.findall(r"<s\d+>", identifier)


def _encoders(pipe, family: Family) -> list[tuple[str, str, str]]:
    """(file key, tokenizer attribute, text encoder attribute) per text encoder, in order."""
    keys = ENCODER_KEYS[family.name]
    return [(keys[i], TOKENIZERS[i], name) for i, name in enumerate(family.text_encoders)]


# ---- adding and removing tokens ----------------------------------------------------------------
def add_tokens(pipe, tokens: list[str], rows: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Add ``tokens`` to every tokenizer (a copy: the original is kept for :func:`remove`) and
    their ``rows[key]`` (N, dim) to each encoder's embedding matrix; returns the new ids per key."""
    family = detect_family(pipe)
    encoders = _encoders(pipe, family)
    for key, tok_name, te_name in encoders:
        _check_rows(rows, key, len(tokens), getattr(pipe, te_name).get_input_embeddings().embedding_dim, "pipeline")
        clash = [t for t in tokens if t in getattr(pipe, tok_name).get_vocab()]
        if clash:
            raise ValueError(f"{tok_name} already has the token(s) {clash}; load one pivotal adapter at a time "
                             f"(or call dorabooth.detach(pipe) first)")
    original = getattr(pipe, _ORIGINAL, None) or {"tokenizers": {}, "rows": {}}
    ids = {}
    for key, tok_name, te_name in encoders:
        tokenizer, te = getattr(pipe, tok_name), getattr(pipe, te_name)
        original["tokenizers"].setdefault(tok_name, tokenizer)
        original["rows"].setdefault(te_name, te.get_input_embeddings().num_embeddings)
        extended = copy.deepcopy(tokenizer)
        extended.add_tokens(tokens)                             # as load_textual_inversion adds them
        setattr(pipe, tok_name, extended)
        ids[key] = extended.convert_tokens_to_ids(tokens)
        embedding = te.get_input_embeddings()
        if max(ids[key]) >= embedding.num_embeddings:
            trains = embedding.weight.requires_grad
            te.resize_token_embeddings(max(ids[key]) + 1, mean_resizing=False)     # our rows go in below
            embedding = te.get_input_embeddings()
            embedding.weight.requires_grad_(trains)
        with torch.no_grad():
            embedding.weight[ids[key]] = rows[key].to(embedding.weight.device, embedding.weight.dtype)
    setattr(pipe, _ORIGINAL, original)
    return ids


def remove(pipe) -> None:
    """Undo :func:`add_tokens` (and training's hooks): the original tokenizers back, the embedding
    matrices cut back to their original rows (which were never changed)."""
    original = getattr(pipe, _ORIGINAL, None)
    if original is None:
        return
    for tok_name, tokenizer in original["tokenizers"].items():
        setattr(pipe, tok_name, tokenizer)
    for te_name, n in original["rows"].items():
        te = getattr(pipe, te_name)
        embedding = te.get_input_embeddings()
        _unhook(embedding)
        if embedding.num_embeddings != n:
            trains = embedding.weight.requires_grad
            te.resize_token_embeddings(n, mean_resizing=False)
            te.get_input_embeddings().weight.requires_grad_(trains)
    delattr(pipe, _ORIGINAL)


def loaded_tokens(pipe) -> list[str]:
    """The pivotal tokens the pipeline has now (``[]`` when none)."""
    if getattr(pipe, _ORIGINAL, None) is None:
        return []
    tokenizer = getattr(pipe, TOKENIZERS[0])
    return sorted((t for t in tokenizer.get_added_vocab() if is_identifier(t)), key=lambda t: int(t[2:-1]))


# ---- training ----------------------------------------------------------------------------------
def initial_rows(pipe, family: Family, n: int, init: str, class_noun: str, seed: int) -> dict[str, torch.Tensor]:
    """(N, dim) starting rows per encoder: ``class`` = the mean of the class noun's token
    embeddings in every row; ``random`` = Gaussian noise × the std of the embedding matrix
    (diffusers' advanced script)."""
    rows = {}
    gen = torch.Generator().manual_seed(seed)
    for key, tok_name, te_name in _encoders(pipe, family):
        weight = getattr(pipe, te_name).get_input_embeddings().weight.detach().float().cpu()
        if init == "class":
            ids = getattr(pipe, tok_name)(class_noun, add_special_tokens=False).input_ids
            ids = [i for i in ids if i < weight.shape[0]]
            if not ids:
                raise ValueError(f"class noun {class_noun!r} has no tokens in {tok_name}; use --pivotal-init random")
            rows[key] = weight[ids].mean(0, keepdim=True).repeat(n, 1)
        else:
            rows[key] = torch.randn(n, weight.shape[1], generator=gen) * weight.std()
    return rows


def attach_trainable(pipe, n: int, init: str, class_noun: str, seed: int) -> list[str]:
    """Add ``n`` tokens to the pipeline and make their rows train: each encoder's token embedding
    gets a ``pivotal_rows`` parameter (fp32, requires grad) that a forward hook splices in. Call it
    after the adapters are attached (attaching freezes the components it does not adapt)."""
    family = detect_family(pipe)
    tokens = token_names(n)
    rows = initial_rows(pipe, family, n, init, class_noun, seed)
    ids = add_tokens(pipe, tokens, rows)
    for key, _, te_name in _encoders(pipe, family):
        first = ids[key][0]
        if ids[key] != list(range(first, first + n)):
            raise ValueError(f"{te_name}: the new tokens did not get consecutive ids ({ids[key]})")
        embedding = getattr(pipe, te_name).get_input_embeddings()
        embedding.register_parameter(ROWS, nn.Parameter(rows[key].clone().float()))
        embedding._dorabooth_first = first
        embedding._dorabooth_hook = embedding.register_forward_hook(_splice)
    return tokens


def _splice(module: nn.Embedding, args, output: torch.Tensor) -> torch.Tensor:
    """The embedding's output with the trainable rows where the ids are pivotal tokens."""
    ids = args[0]
    rows = getattr(module, ROWS)
    first = module._dorabooth_first
    new = ids >= first
    if not bool(new.any()):
        return output
    picked = rows.to(output.dtype)[(ids - first).clamp(0, rows.shape[0] - 1)]
    return torch.where(new[..., None], picked, output)


def _unhook(embedding: nn.Module) -> None:
    hook = getattr(embedding, "_dorabooth_hook", None)
    if hook is not None:
        hook.remove()
        del embedding._dorabooth_hook
        del embedding._dorabooth_first
    if ROWS in embedding._parameters:
        del embedding._parameters[ROWS]


def current_rows(pipe) -> dict[str, torch.Tensor]:
    """The pivotal rows per file key (``clip_l`` …) as they are now: the trainable ones while
    training, else those written into the embedding matrices. ``{}`` without pivotal tokens."""
    tokens = loaded_tokens(pipe)
    if not tokens:
        return {}
    family = detect_family(pipe)
    out = {}
    for key, tok_name, te_name in _encoders(pipe, family):
        embedding = getattr(pipe, te_name).get_input_embeddings()
        if ROWS in embedding._parameters:
            out[key] = getattr(embedding, ROWS).detach().float().cpu().clone()
        else:
            ids = getattr(pipe, tok_name).convert_tokens_to_ids(tokens)
            out[key] = embedding.weight.detach()[ids].float().cpu()
    return out


# ---- the embeddings file -----------------------------------------------------------------------
def save_embeddings(pipe, path: str | os.PathLike) -> Path:
    """The pipeline's pivotal rows as an A1111/ComfyUI embeddings file (``clip_l``/``clip_g``/``clip_h``:
    (N, dim) fp32), the token names and family in its header."""
    rows = current_rows(pipe)
    if not rows:
        raise ValueError("the pipeline has no pivotal tokens to save")
    meta = {"dorabooth.tokens": json.dumps(loaded_tokens(pipe)), "dorabooth.family": detect_family(pipe).name}
    return write_safetensors(path, {k: v.contiguous() for k, v in rows.items()}, meta)


def read_embeddings(path: str | os.PathLike, family: str | None = None) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(token names, rows per key) of an embeddings file we wrote, checked against ``family``."""
    tensors, meta = read_safetensors(path, "embeddings file")
    try:
        tokens = json.loads(meta["dorabooth.tokens"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: no dorabooth.tokens in its header; it is not a pivotal embeddings file written "
                         f"by dorabooth (train with --pivotal, or load it with pipe.load_textual_inversion)") from None
    recorded = meta.get("dorabooth.family")
    if family is not None and recorded and recorded != family:
        raise ValueError(f"{path}: embeddings for a {recorded} model, but the pipeline is {family}; load them onto "
                         f"the model family they were trained on")
    for key in ENCODER_KEYS[family or recorded or "sdxl"]:
        _check_rows(tensors, key, len(tokens), None, str(path))
    return tokens, tensors


def _check_rows(rows: dict[str, torch.Tensor], key: str, n: int, dim: int | None, where: str) -> None:
    value = rows.get(key)
    if value is None or value.ndim != 2 or value.shape[0] != n or (dim is not None and value.shape[1] != dim):
        got = "nothing" if value is None else f"shape {tuple(value.shape)}"
        raise ValueError(f"{where}: {key} must hold {n} embedding rows of width {dim or 'the encoder width'}; "
                         f"got {got}. Use the embeddings file trained with this adapter")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where}: {key} holds NaN/inf values; the embeddings file is damaged")


def load_embeddings(pipe, path: str | os.PathLike) -> list[str]:
    """Add the tokens of an embeddings file we wrote to ``pipe`` (replacing pivotal tokens it has)."""
    tokens, rows = read_embeddings(path, detect_family(pipe).name)
    remove(pipe)
    add_tokens(pipe, tokens, rows)
    return tokens


def embeddings_for(adapter_path: str | os.PathLike, identifier: str | None) -> Path | None:
    """The embeddings file of an adapter trained with pivotal tuning (its subject's token is an
    identifier such as ``<s0><s1>``): ``<name>_emb.safetensors`` beside an exported file, or
    ``embeddings.safetensors`` in its run or checkpoint folder. None for other adapters; raises
    when a pivotal adapter's file is missing."""
    if not is_identifier(identifier):
        return None
    p = Path(adapter_path)
    for candidate in (p.with_name(p.stem + EXPORT_SUFFIX), p.parent / EMBEDDINGS):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{p}: trained with pivotal tuning ({identifier}), but its embeddings file is not beside "
                            f"it ({p.stem + EXPORT_SUFFIX} or {EMBEDDINGS}); copy the embeddings file there")
