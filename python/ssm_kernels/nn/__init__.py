"""Layers built on the ssm_kernels ops."""
