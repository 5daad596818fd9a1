"""Training: the demo model's from-scratch recipe (train.py) and fine-tuning, full or LoRA (finetune.py)."""
