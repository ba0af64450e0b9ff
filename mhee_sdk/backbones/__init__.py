"""Backbones: causal LMs run one decoder layer at a time."""
