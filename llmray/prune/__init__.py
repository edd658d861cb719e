"""The pruning methods `llmray prune` and a recipe's `prune:` block apply, and the command itself: depth (drop
layers), width (shrink MLP channels, attention heads and the hidden size) and sparse (magnitude, wanda; N:M), each
ranking what to remove by activations on calibration samples (`calibrate.py`); `folder.py` prunes a folder and
reports, `recover.py` retrains what was pruned."""
