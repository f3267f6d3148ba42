"""turnwise.adapter"""
