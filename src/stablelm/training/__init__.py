"""Training: the demo model's from-scratch recipe (train.py)."""
