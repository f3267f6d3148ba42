"""Retail desk: a tau-bench-shaped environment (JSON database, production schemas, a terminal tool)."""
