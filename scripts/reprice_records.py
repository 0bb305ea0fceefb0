"""Re-measure the step costs of trace records on this machine, one quiet process at a time.

    .venv/bin/python scripts/reprice_records.py RECORDS.parquet [--threads 1]

Records profiled in llama.cpp (``speckv profile --engine llamacpp``: GGUF targets) are
re-measured in llama.cpp (:func:`speckv.profile.gguf_trace.measure`), trees left out.

A trace's outcomes (what the target emits, what each chain, tree and lookup accepts) do not
depend on timing; its costs are machine facts, measured by each profiling run at its start.
Runs that shared the machine with other work measured them under that load (the bundle's two
shards profile side by side), and a noisy cost vector is an input the controller learns to
exploit. This measures every cost once per compression level with
:func:`speckv.decode.decoder.measure_step_costs` (the draft token, the target's verify
forwards, the catch-up sizes and each tree), in the dtype the records were computed in, and
writes them into every row of that level and into the file's run metadata, atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from speckv.decode.decoder import measure_step_costs
from speckv.llm.load import load_draft_for, load_model
from speckv.machine import fingerprint
from speckv.records import llamacpp_rows, read_metadata, read_records, write_records

COST_COLUMNS = ("cost_draft_s", "cost_verify_s", "cost_catchup_s", "cost_tree_draft_s",
                "cost_tree_verify_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    df = read_records(args.records)
    meta = read_metadata(args.records)
    for compression, rows in df.groupby("compression", observed=True):
        first = rows.iloc[0]
        if llamacpp_rows(rows.iloc[:1])[0]:
            values = _llamacpp_costs(str(first["target_model"]), str(first["draft_model"]),
                                     args.threads)
        else:
            target = load_model(str(first["target_model"]), str(compression),
                                dtype=str(first["compute_dtype"]), device="cpu")
            draft = load_draft_for(str(first["draft_model"]), target, target.compute_dtype)
            values = measure_step_costs(draft, target).to_json()
            del target, draft
        for name in COST_COLUMNS:
            value = values[name]
            if name == "cost_draft_s":
                df.loc[rows.index, name] = np.float32(value)
            else:
                df[name] = df[name].astype(object)
                array = None if value is None else np.asarray(value, np.float32)
                for i in rows.index:
                    df.at[i, name] = array
        for run in meta.get("runs", {}).values():
            if run.get("compression") == compression:
                run["cost"] = values
                run["repriced"] = {"machine": fingerprint(args.threads),
                                   "threads": args.threads}
        print(json.dumps({"compression": compression,
                          "plain_ms": 1e3 * values["cost_verify_s"][0],
                          "verify_ms": [round(1e3 * v, 1) for v in values["cost_verify_s"]],
                          "draft_ms": 1e3 * values["cost_draft_s"],
                          "tree_verify_ms": [round(1e3 * v, 1) for v in
                                             values["cost_tree_verify_s"] or []]}), flush=True)
    write_records(df, args.records, meta)


def _llamacpp_costs(target: str, draft: str, threads: int) -> dict:
    """The cost columns of llama.cpp records, measured in llama.cpp."""
    from speckv.decode.costs import CONTEXT_LEN
    from speckv.engines.llamacpp import GGUFModel
    from speckv.profile.gguf_trace import measure, record_costs

    n_ctx = 1 << (CONTEXT_LEN + 64).bit_length()
    tgt = GGUFModel(target, n_ctx=n_ctx, threads=threads, what="target")
    dft = GGUFModel(draft, n_ctx=n_ctx, threads=threads, what="draft")
    try:
        return record_costs(measure(tgt, dft, CONTEXT_LEN))
    finally:
        tgt.close()
        dft.close()


if __name__ == "__main__":
    main()
