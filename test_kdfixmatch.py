"""Tests for kdfixmatch.py and kernels.py. Run: python -m pytest -q test_kdfixmatch.py"""
