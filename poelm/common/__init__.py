"""Infrastructure every layer above may use: atomic outputs, options, progress."""
