"""The names DESIGN §3 and §7 fix, defined once (a leaf without imports, so the command line
can build its parser without loading torch): adapter methods, magnitude axes, the norm's eps,
export formats and dtypes."""

ADAPTER_METHODS = ("dora", "lora", "dvora")  # the DoRA layer with and without its magnitude; DoRA on VeRA
METHODS = (*ADAPTER_METHODS, "full")       # full: the base weights themselves train
MAGNITUDE_AXES = ("out", "in")             # m: one value per output row (out,) / per input column (1, in)
DVORA_RANK = 256                           # --method dvora default rank (VeRA's, RoBERTa/GLUE), capped per model
MIN_SNR_GAMMA = 5.0                        # Min-SNR γ of the real families (Hang et al. 2023; kohya's and diffusers' usual 5)
NORM_EPS = 1e-12                           # ‖V‖ is clamped here: rows/columns of zero norm give g = 0, not NaN

ADAPTER_FORMATS = ("diffusers-lora", "kohya")                 # adapter files written (DESIGN §7)
MERGED_FORMATS = ("merged-diffusers", "merged-single-file")   # checkpoints with the adapters merged in
EXPORT_FORMATS = (*ADAPTER_FORMATS, *MERGED_FORMATS)
EXPORT_DTYPES = ("fp32", "fp16", "bf16")                      # what `export --dtype` casts merged weights to
