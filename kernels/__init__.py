"""Triton kernels, installed as `nlsr_fast.kernels`. Imported lazily by the op adapters: triton is optional."""
