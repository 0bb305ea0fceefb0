"""The command lines, on top of every stage: ``python -m speckv COMMAND`` dispatches here."""
