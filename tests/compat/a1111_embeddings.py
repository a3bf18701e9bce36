"""Run A1111's own embeddings loader on dorabooth's pivotal-tuning embeddings files (not a test module).

Usage: ``python tests/compat/a1111_embeddings.py CHECKOUT DIR``. CHECKOUT is an A1111 (or Forge)
webui checkout; its ``modules/textual_inversion/textual_inversion.py`` is imported from there as
it is (nothing of it is copied here). What that module imports from the rest of the webui is
replaced by the least that lets it run on a CPU without a loaded checkpoint: ``devices.device``
(the CPU), ``hashes.sha256`` (no cache: None), ``errors.report`` (recorded, so a file the loader
refuses fails the test), ``shared.opts`` and ``shared.sd_model.cond_stage_model``, whose
``tokenize`` is A1111's (``tokenizer(texts, truncation=False, add_special_tokens=False)``, here
with the tiny model's own CLIP tokenizer) and whose ``encode_embedding_init_text`` has the width
A1111 expects of an embedding (SD 1.x: the text encoder's; SDXL: CLIP-L's + CLIP-G's).

``DIR/embeddings.json`` lists, per case, an embeddings folder, that width, the tokenizer folder
and a prompt. ``EmbeddingDatabase.load_textual_inversion_embeddings`` reads the folder as the
webui does at start; ``find_embedding_at_position`` then walks the prompt's tokens as its prompt
parser does. ``DIR/result.json`` receives, per case, what was loaded (name, vectors, shape, the
rows per key), what was skipped, the errors reported and where the prompt names an embedding.
tests/test_pivotal.py writes the input and checks the output.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

REPORTED: list[str] = []


def install_webui_stubs(width: int, tokenizer) -> None:
    def report(message, exc_info=False):
        import traceback

        REPORTED.append(message + ("\n" + traceback.format_exc() if exc_info else ""))

    def tokenize(texts):
        return tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    model = SimpleNamespace(cond_stage_model=SimpleNamespace(
        tokenize=tokenize, encode_embedding_init_text=lambda text, n: torch.zeros(n, width)))
    parts = {                                  # the few attributes of each webui module the loader reaches for
        "shared": dict(sd_model=model, opts=SimpleNamespace(textual_inversion_print_at_load=False)),
        "devices": dict(device=torch.device("cpu"), torch_npu_set_device=lambda: None),
        "errors": dict(report=report),
        "hashes": dict(sha256=lambda filename, title, use_addnet_hash=False: None),
    }
    package = types.ModuleType("modules")
    package.__path__ = []
    sys.modules["modules"] = package
    for name, attributes in parts.items():
        module = types.ModuleType(f"modules.{name}")
        module.__dict__.update(attributes)
        sys.modules[f"modules.{name}"] = module
        setattr(package, name, module)
    ti = types.ModuleType("modules.textual_inversion")
    ti.__path__ = []
    sys.modules["modules.textual_inversion"] = ti
    image_embedding = types.ModuleType("modules.textual_inversion.image_embedding")
    image_embedding.embedding_from_b64 = image_embedding.extract_image_data_embed = lambda *a: None
    sys.modules["modules.textual_inversion.image_embedding"] = image_embedding


def import_loader(checkout: Path):
    path = checkout / "modules" / "textual_inversion" / "textual_inversion.py"
    spec = importlib.util.spec_from_file_location("modules.textual_inversion.textual_inversion", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(checkout: Path, case: dict) -> dict:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(case["tokenizer"])
    REPORTED.clear()
    install_webui_stubs(case["width"], tokenizer)
    loader = import_loader(checkout)
    db = loader.EmbeddingDatabase()
    db.add_embedding_dir(case["folder"])
    db.load_textual_inversion_embeddings(force_reload=True)
    loaded = {}
    for name, embedding in db.word_embeddings.items():
        rows = embedding.vec if isinstance(embedding.vec, dict) else {"": embedding.vec}
        loaded[name] = {"vectors": embedding.vectors, "shape": embedding.shape,
                        "rows": {k: v.tolist() for k, v in rows.items()}}
    tokens = tokenizer([case["prompt"]], truncation=False, add_special_tokens=False)["input_ids"][0]
    found, i = [], 0
    while i < len(tokens):
        embedding, length = db.find_embedding_at_position(tokens, i)
        if embedding is None:
            i += 1
            continue
        found.append({"token_offset": i, "name": embedding.name, "vectors": embedding.vectors})
        i += length
    return {"loaded": loaded, "skipped": sorted(db.skipped_embeddings), "errors": list(REPORTED),
            "found": found, "expected_shape": db.expected_shape}


def main(checkout: str, folder: str) -> None:
    folder = Path(folder)
    cases = json.loads((folder / "embeddings.json").read_text())
    (folder / "result.json").write_text(json.dumps({name: run(Path(checkout), case) for name, case in cases.items()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
