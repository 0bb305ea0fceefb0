"""Engines other than Hugging Face's: speckv's loop and controller inside them.

:mod:`speckv.engines.llamacpp` decodes a GGUF target through llama.cpp's batch API (the
optional extra ``speckv[llamacpp]``): plain decoding, prompt lookup, a GGUF draft at a fixed
γ or with speckv's exported controller choosing γ per step from costs measured in llama.cpp.
:mod:`speckv.engines.gguf_draft` writes speckv's causal-LM draft as a GGUF file llama.cpp
loads. :mod:`speckv.engines.bench` measures them side by side.
"""
