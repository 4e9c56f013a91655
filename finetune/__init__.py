"""Data preparation, task templates, the training recipe and evaluation (see the training issue)."""
