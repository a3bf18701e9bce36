"""The names DESIGN §3 fixes, defined once (a leaf without imports, so the command line can
build its parser without loading torch): adapter methods, magnitude axes, the norm's eps."""

ADAPTER_METHODS = ("dora", "lora")         # the DoRA layer with and without its magnitude
METHODS = (*ADAPTER_METHODS, "full")       # full: the base weights themselves train
MAGNITUDE_AXES = ("out", "in")             # m: one value per output row (out,) / per input column (1, in)
NORM_EPS = 1e-12                           # ‖V‖ is clamped here: rows/columns of zero norm give g = 0, not NaN
