"""``tl-vlm explore``: a local web explorer (``app``) over plain analysis functions (``compute``)."""
