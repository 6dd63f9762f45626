"""Attention kernels of sftplug: Triton for GPUs, chunked matmuls for the CPU (installed as sftplug.kernels)."""
