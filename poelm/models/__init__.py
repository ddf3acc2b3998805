"""Model directories: writing and reading them, their cards, specialists, conversions."""
