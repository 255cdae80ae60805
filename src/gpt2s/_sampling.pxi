# Sampling kernels (per-token work over the vocabulary), included into _core.pyx.
