"""The model: config, backbone and heads, the KV cache, and what every class shares (pretrained.py)."""
