"""Replay the bundled traces of the bench's prompts and compare with the live bench.

`speckv bench --per-task 1 ...` decodes the first prompt of each suite live; this replays the
same prompts' trace records (with the profiling run's measured costs) for the same policies
and prints live ÷ replay tokens/s. Reads runs/bundle/bench_{fp16,int8,nf4}.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from speckv.evaluate.replay import prepare, replay
from speckv.policies import FixedGamma, Heuristic, Learned
from speckv.prompts import TASKS, suite
from speckv.records import read_records
from speckv.runtime import Controller

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    df = read_records(ROOT / "datamodules/smollm2-demo/smollm2-demo.parquet")
    ids = [suite(t)[0].prompt_id for t in TASKS]
    for comp in ("fp16", "int8", "nf4"):
        bench = ROOT / f"runs/bundle/bench_{comp}.json"
        if not bench.is_file():
            continue
        live = json.loads(bench.read_text())["methods"]
        traces = prepare(df[(df.compression == comp) & df.prompt_id.isin(ids)]
                         .reset_index(drop=True))
        rows = {"ar": traces.lengths.sum() / traces.target_time().sum()}
        controller = Controller.load(ROOT / "export/speckv.onnx")
        policies = (("speckv:fixed:4", FixedGamma(4)), ("speckv:heuristic", Heuristic()),
                    ("speckv:onnx", Learned(controller)))
        for name, policy in policies:
            r = replay(traces, policy)
            rows[name] = r.tokens.sum() / r.time_s.sum()
        for name, predicted in rows.items():
            measured = live[name]["tokens_per_s"]
            print(f"{comp} {name:18s} replay {predicted:6.2f}  live {measured:6.2f}  "
                  f"live/replay {measured / predicted:.3f}")


if __name__ == "__main__":
    main()
