"""Decoding: generate() (generate.py), logit processing (sampling.py), streaming; its options are the
model's (stablelm.models.generation_config)."""
