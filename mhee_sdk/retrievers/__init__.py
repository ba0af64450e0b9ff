"""Retrievers: find earlier interactions that help answer a request."""
