"""Benchmark support: PyTorch reference networks (optional extra ``bench``) and timing helpers."""
