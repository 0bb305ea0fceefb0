"""Profiling real speculative decoding into step records: trace mode (the target's answer once,
every γ's outcome at every position) and live mode (the real decoder)."""
