"""Training for small SPHINX models: synthetic data, datasets, recipes."""
