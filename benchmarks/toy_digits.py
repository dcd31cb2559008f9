"""The paper's toy experiment (Appendix E) on 8x8 digits: ES vs SGD over singular values.

Prints the Markdown table, then one JSON line of results (final held-out accuracy on digits 6-9
per cell, `<method>_<vectors>`; `_all` keys are over digits 0-9). Needs scikit-learn (bundled data).

    python benchmarks/toy_digits.py [--seeds 10] [--steps 500] [--plot toy.png]
"""

from __future__ import annotations

import argparse
import io
import json
import sys

from essa.errors import EssaError
from essa.io import atomic_write_bytes
from essa.toy import ToyConfig, ToyResult, format_table, run_toy


def _parse(argv: list[str] | None) -> argparse.Namespace:
    d = ToyConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=len(d.seeds), help="seeds 0..N-1")
    p.add_argument("--steps", type=int, default=d.steps, help="ES generations = SGD steps")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--popsize", type=int, default=d.popsize)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--sgd-lr", type=float, default=d.sgd_lr)
    p.add_argument("--n-sft-samples", type=int, default=d.n_sft_samples)
    p.add_argument("--fitness", choices=("neg_ce", "accuracy"), default=d.es_fitness)
    p.add_argument("--plot", help="write accuracy-vs-step curves to this PNG")
    return p.parse_args(argv)


def _plot(result: ToyResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for key, curve in result.curves.items():
        style = "-" if key.startswith("ES") else "--"
        for ax, acc in zip(axes, (curve.new_acc, curve.all_acc)):
            ax.plot(curve.steps, [100 * a for a in acc], style, label=key)
    for ax, title in zip(axes, ("held-out digits 6-9", "held-out digits 0-9")):
        ax.set(title=title, xlabel="step (ES generation / SGD step)", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        config = ToyConfig(
            rank=args.rank,
            popsize=args.popsize,
            batch_size=args.batch_size,
            sgd_lr=args.sgd_lr,
            steps=args.steps,
            seeds=tuple(range(args.seeds)),
            n_sft_samples=args.n_sft_samples,
            es_fitness=args.fitness,
        )
        result = run_toy(config)
        if args.plot:
            _plot(result, args.plot)
    except EssaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
