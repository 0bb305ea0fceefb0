"""speckv inside other libraries' decoders.

- :mod:`speckv.integrations.transformers`: the controller inside Hugging Face ``generate``
  (``generate_with_speckv(target, assistant, controller, costs, input_ids, **generate_kwargs)``).

This package imports nothing by itself, so importing it never pulls in torch or transformers;
each submodule imports the library it integrates with.
"""
