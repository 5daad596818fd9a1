"""How a projection's weight is stored and multiplied: the linear formats (linear.py), the inference layout
(fast.py), rounding to int8/int4 (rounding.py) and GPTQ (gptq.py). Native kernels: stablelm.kernels."""
