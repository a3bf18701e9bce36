"""``python -m dorabooth …`` and ``accelerate launch -m dorabooth train …``."""
from .cli import main

raise SystemExit(main())
