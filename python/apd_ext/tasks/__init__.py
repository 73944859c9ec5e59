"""Checkable task generators used to train and evaluate the embedded models."""
