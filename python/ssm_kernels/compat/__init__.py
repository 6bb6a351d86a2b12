"""Drop-in shims with the peers' names and signatures, so switching is one import line:

    from ssm_kernels.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from ssm_kernels.compat.mamba_ssm import selective_scan_fn, mamba_chunk_scan_combined
    from ssm_kernels.compat.s4 import cauchy_mult, log_vandermonde
"""
