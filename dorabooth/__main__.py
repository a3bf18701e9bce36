"""``python -m dorabooth …`` and ``accelerate launch -m dorabooth train …``."""
import os

try:
    from .cli import main
except ImportError as error:        # e.g. an incomplete dorabooth/ folder in the current directory
    if os.environ.get("DORABOOTH_DEBUG"):
        raise
    from .importcheck import explain_import_error
    raise SystemExit(f"error: {explain_import_error(error)}") from None

raise SystemExit(main())
