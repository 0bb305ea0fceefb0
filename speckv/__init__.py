"""speckv: choose the speculation length of speculative decoding, step by step.

The package root stays light on purpose: importing ``speckv`` (and ``speckv.runtime``)
must not pull in torch, lightning or transformers.
"""

__version__ = "0.1.0"
