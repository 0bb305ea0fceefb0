"""The examples of docs/EMBEDDING.md, read out of the guide itself, so tests can hold them true."""

from __future__ import annotations

import json
import re

from locations import ROOT

GUIDE = ROOT / "docs" / "EMBEDDING.md"


def text() -> str:
    return GUIDE.read_text()


def cpp_example() -> tuple[list[float], dict]:
    """The numbers the guide pipes into choose_gamma, and the line it says comes back."""
    found = re.search(r'echo "([^"]+)"[^\n]*\n[^\n]*choose_gamma[^\n]*\n(\{[^\n]*\})', text())
    assert found, f"{GUIDE} no longer shows `echo \"...\" | choose_gamma` and its answer"
    numbers = [float(x) for x in found.group(1).replace("\\", " ").split()]
    return numbers, json.loads(found.group(2))


def python_blocks() -> list[str]:
    """Every ```python block of the guide, in order."""
    return re.findall(r"```python\n(.*?)```", text(), flags=re.S)
