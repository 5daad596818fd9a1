"""Decoding: generate() (generate.py), its options (config.py), logit processing (sampling.py), streaming."""
