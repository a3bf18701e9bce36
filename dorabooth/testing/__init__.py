"""Test and benchmark fixtures; the library never imports this package.

- :mod:`.clip_bpe`: CLIP's real BPE vocabulary (49,408 tokens), taken from a registry
  package that ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` and converted to the
  ``vocab.json`` / ``merges.txt`` that ``transformers.CLIPTokenizer`` reads.
- :mod:`.fullsize`: SD 1.5, SD 2.1 (768, v-prediction) and SDXL base at their published
  sizes with random fp16 weights, as a diffusers folder and an original single file,
  cached outside the repository (``python -m dorabooth.testing.fullsize build``).
- :mod:`.memory`: a process's resident memory sampled while it runs (``PeakRSS``).
"""
