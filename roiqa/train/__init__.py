"""Training: the matcher's objective and data, the patch network, task profiles, the verifier, tune spaces."""
