"""turnwise.eval"""
