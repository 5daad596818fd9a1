"""How a projection's weight is stored and multiplied: the linear formats (linear.py), the quantization
schemes they run (schemes.py, rounding in rounding.py, GPTQ in gptq.py), the inference layout (fast.py), LoRA
adapters in PEFT's format (lora.py), and building modules without initialising them (meta.py).
Native kernels: stablelm.kernels."""
