"""Tuning what the analyses find lacking: NegCLIP-style hard-negative tuning of a dual encoder, and swapping a
(tuned) vision encoder into a VLM with its projector retrained."""
