"""turnwise.policy"""
