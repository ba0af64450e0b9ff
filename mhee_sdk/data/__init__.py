"""Datasets, the interaction log, and prompt building."""
