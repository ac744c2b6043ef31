"""Text generation: the KV-cache decoders (CPU and GPU) and the trainer's progress samples."""
