"""A finished ESSA run's final mean or best validated mean as an adapter, whatever its final choice.

The final choice keeps the start unless a challenger beats it on validation with confidence; to
score what the search itself found (e.g. with fresh_heldout.py), this writes the optimizer's mean
from the run's checkpoint (`mean`), or the best validated mean (`best_mean`), as a PEFT adapter.

    python benchmarks/export_search_point.py runs/ifeval/essa runs/ifeval/points/mean
    python benchmarks/export_search_point.py runs/ifeval/essa runs/ifeval/points/best --point best_mean
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import log

from essa.commands import load_inputs
from essa.config import load_config
from essa.errors import EssaError
from essa.io import read_state
from essa.trainer import CHECKPOINT, TrainState, restore_optimizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="an ESSA run directory (holds config.yaml and the checkpoint)")
    parser.add_argument("out", type=Path, help="where the adapter goes")
    parser.add_argument("--point", choices=("mean", "best_mean"), default="mean")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(str(args.run_dir / "config.yaml"), [])
        path = args.run_dir / CHECKPOINT
        if not path.exists():
            raise EssaError(f"{path} not found: give an ESSA run directory (e.g. runs/demo/essa)")
        state = TrainState.from_tree(read_state(path), path)
        space = load_inputs(cfg, Path(cfg.adapter), cfg.essa.alpha).space
        if args.point == "mean":
            z = restore_optimizer(cfg.essa, state).mean
        elif state.best_mean is None:
            raise EssaError(f"{args.run_dir} validated no mean")
        else:
            z = state.best_mean
        space.save_adapter(z, args.out)
    except EssaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"{args.point} (offset norm {float((z ** 2).sum()) ** 0.5:.3f}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
