"""What a training run needs beyond the model: the step (CPU/GPU backends), AdamW, checkpoints, and long-run safety (signals, lock, outlier guard, progress)."""
