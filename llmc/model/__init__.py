"""GPT-2 itself: the parameter layout, the NumPy reference of every op, the CPU and GPU models."""
