"""`essa plan`: the paper's Appendix-B cost model as a calculator.

Predicts the wall-clock time of one ESSA generation and of one gradient (GRPO-style) step on G
GPUs, the communication inside each, the time to reach a target given how many generations and
steps each method needs, and the paper's "ESSA is faster" inequality. Pure arithmetic: nothing
here measures anything unless a calibration function is plugged in.

Model (per GPU throughputs in tokens/s, bandwidth in bytes/s, L tokens per completion):
    T_comm(grad) = 2 * params * bytes_per_param * (G-1) / (G * bw)     ring all-reduce
    T_comm(essa) = M_essa * (G-1) / (G * bw),  M_essa = pair_bytes * N_pop   ring all-gather
    T_essa_gen   = N_pop * B_essa * L / (G * eta_gen) + T_comm(essa)
    T_grad_step  = B_grad * L / (G * eta_gen) + B_grad * L / (G * eta_fb) + T_comm(grad)
"""

from __future__ import annotations

import argparse
import io
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from essa.errors import EssaError
from essa.io import atomic_write_bytes, atomic_write_json, ensure_writable_dir

# Defaults: a 32B model on H100-class GPUs. Rough, documented estimates, not measurements:
# forward-backward ~6*N FLOPs/token at ~40% of ~1 PFLOP/s bf16 -> ~2000 tok/s per GPU;
# memory-bound batched decode of 64 GB of bf16 weights -> ~1500 tok/s per GPU.
DEFAULT_MODEL_PARAMS = 32e9
DEFAULT_GEN_THROUGHPUT = 1500.0
DEFAULT_FB_THROUGHPUT = 2000.0
DEFAULT_BANDWIDTH = 50e9  # bytes/s per GPU (400 Gb/s-class interconnect)
DEFAULT_GPUS = (1, 2, 4, 8, 16, 32, 64, 128)
# The paper does not report step counts. These make the G=16 predictions land near its 32B
# PRM800K times (~200 min ESSA, ~400 min GRPO) with the other defaults; they are illustrative.
DEFAULT_ESSA_GENERATIONS = 30
DEFAULT_GRAD_STEPS = 600

_COUNT_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?"
_COUNT_RE = re.compile(rf"^\s*{_NUMBER}\s*([kKmMbBgGtT]?)\s*$")
_BW_RE = re.compile(rf"^\s*{_NUMBER}\s*(?:([kKMGT])(i?))?\s*(B|b|bit|bits|byte|bytes)?\s*(/s|ps)?\s*$")
_DECIMAL_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BINARY_PREFIX = {"": 1.0, "k": 2**10, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class PlanInputs:
    """Everything the cost model needs; times come out in seconds."""

    model_params: float = DEFAULT_MODEL_PARAMS
    bytes_per_param: float = 2.0
    bandwidth: float = DEFAULT_BANDWIDTH
    gen_throughput: float = DEFAULT_GEN_THROUGHPUT
    fb_throughput: float = DEFAULT_FB_THROUGHPUT
    popsize: int = 96
    essa_batch: int = 100
    grad_batch: int = 512  # e.g. 64 prompts x 8 completions per GRPO step
    tokens: int = 1024
    pair_bytes: int = 8  # one (candidate index, reward) pair
    essa_generations: int = DEFAULT_ESSA_GENERATIONS
    grad_steps: int = DEFAULT_GRAD_STEPS

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise EssaError(f"plan: {name} must be a positive finite number, got {value!r}")


# ---------------------------------------------------------------- parsing user input


def _number(mantissa: str, exponent: str | None) -> float:
    return float(f"{mantissa}e{exponent or 0}")  # overflow gives inf, rejected by the caller


def parse_count(text: str | float, what: str = "value") -> float:
    """'32B', '135M', '1.5k', '32e9', 32e9 -> a positive float (k/M/B|G/T are powers of 1000)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _COUNT_RE.match(str(text))
        if not match:
            raise EssaError(f"plan: cannot parse {what} {text!r} (use e.g. 32e9, 32B, 135M, 1.5k)")
        value = _number(match[1], match[2]) * _COUNT_SUFFIX[match[3].lower()]
    if not (math.isfinite(value) and value > 0):
        raise EssaError(f"plan: {what} must be positive, got {text!r}")
    return value


def parse_bandwidth(text: str | float) -> float:
    """'50GB/s', '400Gb/s', '400Gbps', '25GiB/s', '50e9' (bytes/s) -> bytes per second."""
    if isinstance(text, (int, float)):
        return parse_count(text, "bandwidth")
    match = _BW_RE.match(str(text))
    if not match:
        raise EssaError(f"plan: cannot parse bandwidth {text!r} (use e.g. 50GB/s, 400Gb/s, 50e9)")
    mantissa, exponent, prefix, binary, unit, _ = match.groups()
    if prefix and not unit:
        raise EssaError(f"plan: bandwidth {text!r} is ambiguous: "
                        f"write {prefix}B/s (bytes) or {prefix}b/s (bits)")
    scale = (_BINARY_PREFIX if binary else _DECIMAL_PREFIX)[prefix or ""]
    bits = unit is not None and unit != "B" and not unit.startswith("byte")
    value = _number(mantissa, exponent) * scale / (8.0 if bits else 1.0)
    if not (math.isfinite(value) and value > 0):
        raise EssaError(f"plan: bandwidth must be positive, got {text!r}")
    return value


def parse_gpus(text: str) -> list[int]:
    """'1,2,4,8' -> sorted unique positive GPU counts."""
    counts: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not re.fullmatch(r"[+-]?\d+", part):
            raise EssaError(f"plan: --gpus wants comma-separated integers, got {text!r}")
        if int(part) < 1:
            raise EssaError(f"plan: GPU counts must be >= 1, got {int(part)}")
        counts.add(int(part))
    return sorted(counts)


def _parse_int(text: str, what: str) -> int:
    value = parse_count(text, what)
    if value != int(value):
        raise EssaError(f"plan: {what} must be a whole number, got {text!r}")
    return int(value)


# ---------------------------------------------------------------- the cost model


def ring_allreduce_time(nbytes: float, gpus: int, bandwidth: float) -> float:
    """Bandwidth term of a ring all-reduce: each GPU sends and receives 2 (G-1)/G of the data."""
    return 2.0 * nbytes * (gpus - 1) / (gpus * bandwidth)


def ring_allgather_time(nbytes: float, gpus: int, bandwidth: float) -> float:
    """Bandwidth term of a ring all-gather of `nbytes` in total: (G-1)/G of it crosses each link."""
    return nbytes * (gpus - 1) / (gpus * bandwidth)


def essa_message_bytes(p: PlanInputs) -> float:
    """M_essa: one (index, reward) pair per candidate; no dependence on model size."""
    return float(p.pair_bytes * p.popsize)


def grad_comm_time(p: PlanInputs, gpus: int) -> float:
    return ring_allreduce_time(p.model_params * p.bytes_per_param, gpus, p.bandwidth)


def essa_comm_time(p: PlanInputs, gpus: int) -> float:
    return ring_allgather_time(essa_message_bytes(p), gpus, p.bandwidth)


def essa_generation_time(p: PlanInputs, gpus: int) -> dict[str, float]:
    """Seconds for one ESSA generation: every candidate on its B_essa prompts, then the all-gather."""
    compute = p.popsize * p.essa_batch * p.tokens / (gpus * p.gen_throughput)
    comm = essa_comm_time(p, gpus)
    return {"compute": compute, "comm": comm, "total": compute + comm}


def grad_step_time(p: PlanInputs, gpus: int) -> dict[str, float]:
    """Seconds for one gradient step: rollouts, forward-backward over them, gradient all-reduce."""
    tokens = p.grad_batch * p.tokens
    rollout = tokens / (gpus * p.gen_throughput)
    fb = tokens / (gpus * p.fb_throughput)
    comm = grad_comm_time(p, gpus)
    return {"rollout": rollout, "forward_backward": fb, "comm": comm, "total": rollout + fb + comm}


def inequality_sides(p: PlanInputs, gpus: int) -> tuple[float, float]:
    """(lhs, rhs) of the paper's test N_pop B_essa < B_grad (eta_fb/(G eta_gen) + 1) + (G-1) M/(bw G eta_gen).

    The paper's symbols are read so that the test is exactly "one ESSA generation is quicker than
    one gradient step" under the model above: eta_gen = seconds per completion generated by the
    whole G-GPU cluster, eta_fb = seconds per completion of forward-backward on one GPU, and
    M = net bytes the gradient method communicates beyond ESSA (2 params bytes - M_essa).
    """
    eta_gen = p.tokens / (gpus * p.gen_throughput)
    eta_fb = p.tokens / p.fb_throughput
    net_bytes = 2.0 * p.model_params * p.bytes_per_param - essa_message_bytes(p)
    lhs = float(p.popsize * p.essa_batch)
    rhs = (p.grad_batch * (eta_fb / (gpus * eta_gen) + 1.0)
           + (gpus - 1) * net_bytes / (p.bandwidth * gpus * eta_gen))
    return lhs, rhs


def essa_generation_faster(p: PlanInputs, gpus: int) -> bool:
    lhs, rhs = inequality_sides(p, gpus)
    return lhs < rhs


def plan_row(p: PlanInputs, gpus: int) -> dict[str, Any]:
    essa, grad = essa_generation_time(p, gpus), grad_step_time(p, gpus)
    lhs, rhs = inequality_sides(p, gpus)
    essa_total = p.essa_generations * essa["total"]
    grad_total = p.grad_steps * grad["total"]
    return {
        "gpus": gpus,
        "essa_generation_s": essa["total"],
        "essa_compute_s": essa["compute"],
        "essa_comm_s": essa["comm"],
        "grad_step_s": grad["total"],
        "grad_rollout_s": grad["rollout"],
        "grad_forward_backward_s": grad["forward_backward"],
        "grad_comm_s": grad["comm"],
        "step_over_generation": grad["total"] / essa["total"],
        "inequality_lhs": lhs,
        "inequality_rhs": rhs,
        "essa_generation_faster": lhs < rhs,
        "essa_time_to_target_s": essa_total,
        "grad_time_to_target_s": grad_total,
        "essa_speedup": grad_total / essa_total,
    }


def plan_rows(p: PlanInputs, gpus: list[int]) -> list[dict[str, Any]]:
    for g in gpus:
        if int(g) != g or g < 1:
            raise EssaError(f"plan: GPU counts must be integers >= 1, got {g!r}")
    return [plan_row(p, int(g)) for g in gpus]


# ---------------------------------------------------------------- reporting


def assumptions(p: PlanInputs) -> list[str]:
    return [
        f"gradients: one ring all-reduce per step of params x {p.bytes_per_param:g} bytes "
        "(2 = fp16/bf16), T = 2 M (G-1) / (G bw); no overlap with compute",
        f"ESSA: one ring all-gather per generation of N_pop (index, reward) pairs of {p.pair_bytes} bytes, "
        "M_essa = pair_bytes x N_pop, T = M_essa (G-1) / (G bw); independent of model size",
        "bw is the peak per-GPU bandwidth; per-message latency is ignored",
        "perfect compute scaling: all work divides evenly over G GPUs (no stragglers, no idle GPUs "
        "when N_pop is not a multiple of G, no tensor-parallel overhead); memory fit is not checked",
        f"every completion has L = {p.tokens} tokens; prompt prefill is folded into the throughputs",
        "gradient step = generate B_grad completions + one forward-backward over them + all-reduce; "
        "no reference-model pass, optimizer update or weight sync to an inference engine",
        "ESSA generation = N_pop x B_essa completions at the same generation throughput + all-gather; "
        "CMA-ES ask/tell time ignored",
        f"throughputs per GPU: generation {p.gen_throughput:g} tok/s, "
        f"forward-backward {p.fb_throughput:g} tok/s "
        "(defaults are rough H100-class estimates for a 32B bf16 model, not measurements)",
        f"time to target = {p.essa_generations} ESSA generations vs {p.grad_steps} gradient steps "
        "(defaults are illustrative, chosen to land near the paper's 32B times at 16 GPUs)",
        "inequality N_pop B_essa < B_grad (eta_fb/(G eta_gen) + 1) + (G-1) M/(bw G eta_gen) is read with "
        "eta_gen = L/(G gen_throughput) s per completion for the cluster, eta_fb = L/fb_throughput s per "
        "completion on one GPU, M = 2 params bytes - M_essa; so read, it is exactly "
        "'one ESSA generation is quicker than one gradient step' (with tokens/s its units do not match)",
        "speedup = gradient time to target / ESSA time to target",
    ]


# (below this many seconds, multiply by, unit); hours beyond the last.
_DURATION_UNITS = (
    (1e-6, 1e9, "ns"), (1e-3, 1e6, "us"), (1.0, 1e3, "ms"), (120.0, 1.0, "s"), (7200.0, 1 / 60, "min"),
)


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0"
    for limit, scale, unit in _DURATION_UNITS:
        if seconds < limit:
            return f"{seconds * scale:.3g} {unit}"
    return f"{seconds / 3600:.3g} h"


_COLUMNS = (
    ("G", lambda r: str(r["gpus"])),
    ("ESSA/gen", lambda r: format_duration(r["essa_generation_s"])),
    ("ESSA comm", lambda r: format_duration(r["essa_comm_s"])),
    ("grad/step", lambda r: format_duration(r["grad_step_s"])),
    ("grad comm", lambda r: format_duration(r["grad_comm_s"])),
    ("step/gen", lambda r: f"{r['step_over_generation']:.3g}"),
    ("gen<step?", lambda r: "yes" if r["essa_generation_faster"] else "no"),
    ("ESSA total", lambda r: format_duration(r["essa_time_to_target_s"])),
    ("grad total", lambda r: format_duration(r["grad_time_to_target_s"])),
    ("speedup", lambda r: f"{r['essa_speedup']:.2f}x"),
)


def format_count(value: float) -> str:
    """32e9 -> '32B', 1.35e8 -> '135M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[name for name, _ in _COLUMNS]] + [[fmt(r) for _, fmt in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(p: PlanInputs, rows: list[dict[str, Any]]) -> str:
    header = (
        f"ESSA vs gradient cost model: {format_count(p.model_params)} params x {p.bytes_per_param:g} B, "
        f"bw {p.bandwidth / 1e9:.3g} GB/s, N_pop {p.popsize}, B_essa {p.essa_batch}, "
        f"B_grad {p.grad_batch}, L {p.tokens}"
    )
    notes = "\n".join(f"  - {a}" for a in assumptions(p))
    return f"{header}\n\n{format_table(rows)}\n\nAssumptions:\n{notes}"


def _positive(xs: list[int], ys: list[float]) -> tuple[list[int], list[float]]:
    """Drop zero values (e.g. no communication at G=1), which a log axis cannot show."""
    kept = [(x, y) for x, y in zip(xs, ys) if y > 0]
    return [x for x, _ in kept], [y for _, y in kept]


def plot_png(p: PlanInputs, rows: list[dict[str, Any]]) -> bytes:
    """Three panels vs G (log2 x): time per generation/step, time to target, ESSA speedup."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    g = [r["gpus"] for r in rows]
    fig = Figure(figsize=(15, 4.4))
    per_unit, to_target, speedup = fig.subplots(1, 3)
    per_unit.plot(g, [r["essa_generation_s"] for r in rows], "o-", label="ESSA: one generation")
    per_unit.plot(g, [r["grad_step_s"] for r in rows], "s-", label="gradient: one step")
    per_unit.plot(*_positive(g, [r["grad_comm_s"] for r in rows]), "s:", label="gradient all-reduce")
    per_unit.set(title="predicted time per generation / step", ylabel="seconds", yscale="log")
    to_target.plot(g, [r["essa_time_to_target_s"] / 60 for r in rows], "o-",
                   label=f"ESSA ({p.essa_generations} generations)")
    to_target.plot(g, [r["grad_time_to_target_s"] / 60 for r in rows], "s-",
                   label=f"gradient ({p.grad_steps} steps)")
    to_target.set(title="predicted time to target", ylabel="minutes", yscale="log")
    speedup.plot(g, [r["essa_speedup"] for r in rows], "o-", color="C2", label="gradient time / ESSA time")
    speedup.axhline(1.0, color="grey", lw=0.8)
    speedup.set(title="predicted ESSA speedup to target", ylabel="x")
    for ax in (per_unit, to_target, speedup):
        ax.set_xscale("log", base=2)
        ax.set_xticks(g, [str(x) for x in g])
        ax.set_xlabel("GPUs (G)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ESSA vs gradient cost model: {format_count(p.model_params)} parameters, "
                 f"bw {p.bandwidth / 1e9:.3g} GB/s")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_outputs(out_dir: str | Path, p: PlanInputs, rows: list[dict[str, Any]]) -> None:
    out = ensure_writable_dir(out_dir)
    atomic_write_json(out / "plan.json", {"inputs": asdict(p), "assumptions": assumptions(p), "rows": rows})
    atomic_write_bytes(out / "plan.png", plot_png(p, rows))


# ---------------------------------------------------------------- command line


# (flag, default, help); values are parsed by this module so bad input becomes an EssaError.
_D = PlanInputs()
_OPTIONS = (
    ("--model-params", f"{_D.model_params:g}", "parameters, e.g. 32e9 or 32B"),
    ("--bytes-per-param", f"{_D.bytes_per_param:g}", "gradient bytes per parameter (2: fp16/bf16)"),
    ("--bandwidth", f"{_D.bandwidth:g}", "peak per-GPU bandwidth: 50GB/s, 400Gb/s, or bytes/s"),
    ("--gen-throughput", None, f"generation tokens/s per GPU (default {_D.gen_throughput:g})"),
    ("--fb-throughput", None, f"forward-backward tokens/s per GPU (default {_D.fb_throughput:g})"),
    ("--popsize", str(_D.popsize), "ESSA population N_pop"),
    ("--essa-batch", str(_D.essa_batch), "prompts per candidate B_essa"),
    ("--grad-batch", str(_D.grad_batch), "completions per gradient step B_grad"),
    ("--tokens", str(_D.tokens), "tokens per completion L"),
    ("--pair-bytes", str(_D.pair_bytes), "bytes per (index, reward) pair in ESSA's all-gather"),
    ("--gpus", ",".join(map(str, DEFAULT_GPUS)), "comma-separated GPU counts"),
    ("--essa-generations", str(_D.essa_generations), "ESSA generations to reach the target"),
    ("--grad-steps", str(_D.grad_steps), "gradient steps to reach the target"),
    ("--out", None, "directory for plan.json and plan.png"),
)


DESCRIPTION = "Predicted wall-clock of ESSA vs a gradient method on G GPUs (the paper's Appendix-B cost model)."


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `essa plan`, added to its parser in the CLI."""
    for flag, default, help_text in _OPTIONS:
        ap.add_argument(flag, default=default, help=help_text)
    ap.add_argument("--calibrate", action="store_true", help="measure the throughputs on this machine")


Calibration = Callable[[], tuple[float, float]]


def _throughputs(args: argparse.Namespace, calibrate_fn: Calibration | None) -> tuple[float, float]:
    """Explicit flags win; otherwise calibrated values (with --calibrate) or the documented defaults."""
    gen, fb = DEFAULT_GEN_THROUGHPUT, DEFAULT_FB_THROUGHPUT
    if args.calibrate:
        if calibrate_fn is None:
            raise EssaError("plan: --calibrate is not available here (no measurement function is installed)")
        measured = calibrate_fn()
        if not (isinstance(measured, (tuple, list)) and len(measured) == 2):
            raise EssaError("plan: calibration must return (gen_throughput, fb_throughput), "
                            f"got {measured!r}")
        gen = parse_count(measured[0], "calibrated generation throughput")
        fb = parse_count(measured[1], "calibrated forward-backward throughput")
    if args.gen_throughput is not None:
        gen = parse_count(args.gen_throughput, "--gen-throughput")
    if args.fb_throughput is not None:
        fb = parse_count(args.fb_throughput, "--fb-throughput")
    return gen, fb


def inputs_from_args(args: argparse.Namespace, calibrate_fn: Calibration | None = None) -> PlanInputs:
    gen, fb = _throughputs(args, calibrate_fn)
    return replace(
        PlanInputs(),
        model_params=parse_count(args.model_params, "--model-params"),
        bytes_per_param=parse_count(args.bytes_per_param, "--bytes-per-param"),
        bandwidth=parse_bandwidth(args.bandwidth),
        gen_throughput=gen,
        fb_throughput=fb,
        popsize=_parse_int(args.popsize, "--popsize"),
        essa_batch=_parse_int(args.essa_batch, "--essa-batch"),
        grad_batch=_parse_int(args.grad_batch, "--grad-batch"),
        tokens=_parse_int(args.tokens, "--tokens"),
        pair_bytes=_parse_int(args.pair_bytes, "--pair-bytes"),
        essa_generations=_parse_int(args.essa_generations, "--essa-generations"),
        grad_steps=_parse_int(args.grad_steps, "--grad-steps"),
    )


def run_plan(args: argparse.Namespace, calibrate_fn: Calibration | None = None) -> int:
    """`essa plan`: print the table and assumptions, optionally write --out files."""
    p = inputs_from_args(args, calibrate_fn)
    rows = plan_rows(p, parse_gpus(args.gpus))
    print(format_report(p, rows))
    if args.out is not None:
        write_outputs(args.out, p, rows)
        print(f"\nwrote {Path(args.out) / 'plan.json'} and {Path(args.out) / 'plan.png'}")
    return 0
