"""Loading models: Hugging Face ids, local folders, GGUF files; INT8/NF4 compression through
bitsandbytes; speckv's own draft format (a reduced head, weights shared with the target)."""
