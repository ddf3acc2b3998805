"""Evaluation: bits per byte of every stage predictor and of their Log-OP combination."""
