"""Tune-and-compress pipeline."""
