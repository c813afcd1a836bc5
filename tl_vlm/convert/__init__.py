"""The converter library: HF checkpoint keys -> TL parameters (rules), and HF configs -> tower configs.

One builder per kind of weight (attention, linear, norm, MLP) in ``rules``; config and rule builders per
language-model kind in ``text_lms``, per ViT kind in ``vits``, and the Q-Former in ``qformer``. Families
compose them; none writes its own.
"""
