"""dorabooth's browser app (``dorabooth-ui``): Gradio layout and wiring in ``app``, the plain
handler functions it calls in ``handlers``, the training queue in ``worker``, the folders in
``workspace``. Needs the ``ui`` extra (gradio); the dorabooth library never imports this."""
