"""Decoding: the lossless speculative decoder, its greedy invariant, measured step costs and
the live benchmark."""
