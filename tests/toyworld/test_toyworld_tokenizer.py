"""The toy tokenizer: CLIP files that transformers loads; world words are single tokens."""
import pytest

from dorabooth.toyworld import tokenizer as toktools
from dorabooth.toyworld import world


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return toktools.load_tokenizer(toktools.write_tokenizer(tmp_path_factory.mktemp("tok")))


def test_every_known_word_is_one_token(tok):
    for w in toktools.WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_rare_tokens_are_single_and_never_in_captions(tok):
    _, captions, _ = world.dataset(500, seed=0)
    words = {w.strip(",") for c in captions for w in c.split()}
    for t in toktools.RARE_TOKENS:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1
        assert t not in words


def test_captions_round_trip(tok):
    _, captions, _ = world.dataset(200, seed=1)
    assert tok.decode(tok("a square, left half red").input_ids, skip_special_tokens=True) \
        == "a square , left half red"
    for c in captions + ["a photo of sks dog", "Ünïcode & 123 still works!"]:
        ids = tok(c).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        text = tok.decode(ids, skip_special_tokens=True)  # CLIP decodes `</w>` as a space
        assert "".join(text.split()) == "".join(c.lower().split())


def test_padded_to_clip_length(tok):
    ids = tok(["a star"], padding="max_length", max_length=tok.model_max_length,
              truncation=True).input_ids[0]
    assert tok.model_max_length == 77 and len(ids) == 77
    assert tok.eos_token_id == max(tok.get_vocab().values())
