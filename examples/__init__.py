"""Runnable example environments and agents."""
