"""How much of another adapter's change ESSA's search space can hold.

Projects a LoRA adapter trained from the same start by other means (e.g. a GRPO snapshot of `essa
compare`) onto a subspace of the start and writes the projection as a PEFT adapter. `--onto`:
- `values` (ESSA's space): the start's frozen singular vectors, every singular value refit by least
  squares (`SvdLoraSpace.project`);
- `core`: any r x r mixing within the start's output and input directions (B A projected onto the
  column space of the start's B and the row space of its A), a superset of `values`;
- `output`: only B A's output side kept in the start's B columns (A free);
- `input`: only B A's input side kept in the start's A rows (B free).

Prints one JSON line: the relative change of the A and B factors from the start, and the share of the change of each module's
delta B A that the projection keeps (the regression coefficient of the projected change on the
full change, averaged over modules: 1 = all of it, 0 = none). Score both with
`essa eval --split test adapter=OUT --compare-to START`.

    python benchmarks/project_adapter.py --start runs/demo/sft/adapter \\
        --adapter runs/cmp/grpo/lr_0.0003/snapshots/step00005 --out runs/projected [--onto core]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch
from _common import json_main, log

from essa.svd_space import SvdLoraSpace, read_lora_factors

SUBSPACES = ("values", "core", "output", "input")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", required=True, help="the start adapter (its singular vectors span the space)")
    parser.add_argument("--adapter", required=True, help="the adapter to project (same modules and rank)")
    parser.add_argument("--out", required=True, help="where to write the projected adapter")
    parser.add_argument("--onto", choices=SUBSPACES, default="values", help="the start's subspace to project onto")
    return parser.parse_args(argv)


def _project_spans(space: SvdLoraSpace, other: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   onto: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors (A, B) of B A projected onto the start's output span (columns of its B, U_B)
    and/or input span (rows of its A, V_A^T), in the start's dtype like `SvdLoraSpace.project`."""
    out = {}
    for p in space.pairs:
        a, b = (t.double() for t in other[p.name])
        u_b, v_a = p.u_b, p.v_a
        if onto == "core":
            a, b = v_a.T, u_b @ (u_b.T @ b @ a @ v_a)
        elif onto == "output":
            b = u_b @ (u_b.T @ b)
        else:  # input
            a = (a @ v_a) @ v_a.T
        out[p.name] = (a.to(p.a.dtype), b.to(p.b.dtype))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    space = SvdLoraSpace.from_adapter(args.start, 1.0)
    other = read_lora_factors(args.adapter)
    projected = space.project(other) if args.onto == "values" else _project_spans(space, other, args.onto)
    rel_a, rel_b, kept = [], [], []
    for p in space.pairs:
        a, b = (t.double() for t in other[p.name])
        pa, pb = (t.double() for t in projected[p.name])
        start = p.b.double() @ p.a.double()
        rel_a.append(float((a - p.a).norm() / p.a.norm()))
        rel_b.append(float((b - p.b).norm() / p.b.norm()))
        full, kept_change = b @ a - start, pb @ pa - start
        kept.append(float((full * kept_change).sum() / max(float(full.norm()) ** 2, 1e-30)))
    space.save_factors(projected, args.out)
    log(f"projected adapter written to {args.out}")
    return {"onto": args.onto, "modules": len(space.pairs), "relative_change_a": float(np.mean(rel_a)),
            "relative_change_b": float(np.mean(rel_b)), "delta_change_kept": float(np.mean(kept)),
            "out": str(args.out)}


if __name__ == "__main__":
    sys.exit(json_main(run, _parse(sys.argv[1:])))
