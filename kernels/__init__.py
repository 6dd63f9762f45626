"""Kernels of sftplug: Triton attention for GPUs, chunked attention for the CPU, packed rows for SDPA.

Installed as sftplug.kernels; they import only torch and triton (tests/test_architecture.py).
"""
