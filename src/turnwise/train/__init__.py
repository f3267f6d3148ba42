"""turnwise.train"""
