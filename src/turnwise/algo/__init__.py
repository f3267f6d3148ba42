"""turnwise.algo"""
