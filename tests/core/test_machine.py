"""The machine fingerprint: what it records, and which differences refuse a measured cost."""

from __future__ import annotations

import json
import subprocess
import sys

from speckv.machine import COST_KEYS, ISA_FLAGS, describe, fingerprint, mismatch


def test_fingerprint_is_json_and_names_the_cpu_and_its_isa():
    fp = fingerprint(threads=1)
    assert json.loads(json.dumps(fp)) == fp
    assert fp["cpu"] and fp["threads"] == 1 and fp["cores"] >= 1
    assert set(fp["isa"]) == set(ISA_FLAGS) and all(isinstance(v, bool) for v in fp["isa"].values())
    assert fp["numpy"]  # installed, so a version
    line = describe(fp)
    assert fp["cpu"] in line and "1 thread" in line


def test_the_kernel_cap_is_recorded(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    fp = fingerprint()
    assert fp["aten_cpu_capability"] == "avx2" and "ATEN_CPU_CAPABILITY=avx2" in describe(fp)


def test_mismatch_names_each_field_that_changes_costs():
    here = fingerprint(threads=2)
    assert mismatch(here, here) == []
    other = {**here, "cpu": "Another CPU", "threads": 1,
             "isa": {**here["isa"], "avx512f": not here["isa"]["avx512f"]}}
    found = mismatch(other, here)
    assert len(found) == 3 and any(f.startswith("cpu:") for f in found)
    assert any(f.startswith("threads:") for f in found)
    assert mismatch(None, here) == ["no machine fingerprint"]
    # versions of libraries that do not change costs are not a mismatch
    assert mismatch({**here, "numpy": "0.0"}, here) == []
    assert "numpy" not in COST_KEYS


def test_fingerprint_imports_no_torch():
    code = ("import sys, speckv.machine as m; m.fingerprint(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
