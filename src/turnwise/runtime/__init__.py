"""turnwise.runtime"""
