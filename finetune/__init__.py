"""Data preparation, task templates, the training recipe and evaluation."""
