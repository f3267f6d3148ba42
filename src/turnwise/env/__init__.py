"""turnwise.env"""
