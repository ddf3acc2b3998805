"""Training loops (pretraining, specialist SFT) over shared distributed, checkpoint and metrics helpers."""
