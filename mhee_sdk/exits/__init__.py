"""Exit heads and exit policies."""
