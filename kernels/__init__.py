"""Triton kernels, each beside its pure-PyTorch reference. Installed and imported as `k15.kernels`."""
