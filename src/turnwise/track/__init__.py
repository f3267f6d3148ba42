"""turnwise.track"""
