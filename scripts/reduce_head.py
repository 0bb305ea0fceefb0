"""A saved causal-LM draft with its head cut down to a reduced vocabulary, nothing retrained.

The "+ reduced vocabulary" row of the draft comparison: the draft's own logits over the N
tokens of another draft's reduced head (the target's most frequent answer tokens), the rest
never proposed. With a tied head (the target's output embeddings) the N logits are exactly
the ones the draft computed before; only the cost of the head changes.

    python scripts/reduce_head.py models/speckv-draft-v1 --tokens-from models/speckv-draft \
        --out runs/drafts/speckv-draft-v1-reduced
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from speckv.llm.draft import DraftSpec, load_draft, save_draft
from speckv.llm.head import ReducedHead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("draft", type=Path, help="a saved speckv causal-LM draft (full head)")
    ap.add_argument("--tokens-from", type=Path, required=True,
                    help="a saved speckv draft whose reduced head's token ids to use")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    meta = json.loads((args.draft / "speckv_draft.json").read_text())
    if meta.get("kind") == "feature" or meta.get("draft_vocab"):
        raise SystemExit(f"{args.draft} is not a full-head causal-LM draft.")
    token_ids = load_file(str(args.tokens_from / "draft.safetensors"))["lm_head.token_ids"]
    model = load_draft(args.draft, dtype=torch.float32)
    full = model.get_output_embeddings().weight
    model.lm_head = ReducedHead(full[token_ids], token_ids, full.shape[0])
    model.config.tie_word_embeddings = False
    spec = replace(DraftSpec(base=meta["base"], init_layers=meta["init_layers"]),
                   draft_vocab=len(token_ids))
    card = {k: v for k, v in meta.items() if k not in ("base", "init_layers", "draft_vocab",
                                                       "trained_head")}
    save_draft(model, spec, args.out, {**card, "reduced_from": str(args.draft),
                                       "tokens_from": str(args.tokens_from)})
    print(f"{args.out}: {args.draft} with a {len(token_ids)}-token head")


if __name__ == "__main__":
    main()
