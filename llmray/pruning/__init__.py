"""The pruning methods `llmray prune` and a recipe's `prune:` block apply: depth (drop layers), width (shrink MLP
channels, attention heads and the hidden size) and sparse (magnitude, wanda; N:M). Each ranks what to remove by
activations on calibration samples (`calibrate.py`)."""
