"""Triton kernels of sftplug (installed as sftplug.kernels)."""
