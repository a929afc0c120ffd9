"""How the converter quantizes each matrix: layout per tensor, scales, rounding.

  method "rtn"     round to nearest on min/max scales (the baseline)
  method "search"  per-group scale (and min) search minimising the squared error (default); int4
                   only: for int8 it lowered the weight error but raised perplexity (SmolLM2, 24
                   windows: +0.42% against +0.29% for min/max), so int8 keeps min/max scales
  method "gptq"    GPTQ (pyllm/convert/gptq.py) with Hessians from a calibration text
                   (pyllm/convert/calibrate.py), layer after layer on the quantized model's activations

--quant int4 (rather than int4_sym / int4_asym at a fixed group size) chooses each matrix's layout
among INT4_CANDIDATES, and int8 for the most sensitive ones, to minimise the sum of relative
layer-output errors under a bits budget (BITS_BUDGET bits per weight over the linear layers,
scales and mins included). A layout's error is measured on a sample of rows with the scale search:
the relative weight error without calibration, the relative output error tr(dW H dW^T)/tr(W H W^T)
with it. --keep-sensitive N additionally stores the N matrices of largest error at int8.
With the default budget, --quant int4 first tries UNIFORM_INT4: every matrix int4_asym_dq g32
(int4_asym's grid with 8-bit coded scales and mins, 4.5 bits/weight plus 64 bits a row), taken when
it fits the budget (the steps cost 64 bits a row: rows of about 640 values on average and more). On
the four held-out domains it measured better than the per-matrix allocation on SmolLM2 and both
rotated twins, on the mean and on the worst domain (24 windows: worst +0.33% / +8.91% / +9.45%
against +0.40% / +9.81% / +12.26%; docs/QUALITY.md, 2026-12-01): the allocation's criterion (errors
under the calibration Hessians) spends bits where held-out text does not need them. An explicit
--bits, --group-size or --keep-sensitive runs the allocation.
A --group-size given with --quant int4 is kept: the choice is then between int4_sym, int4_asym_dq
and int4_asym at that group size (and int8 at that group size for --keep-sensitive).
The embeddings and lm_head follow the pipeline's rule (int8, group 32).
--awq (with calibration) adds activation-aware per-channel scales before GPTQ (pyllm/convert/awq.py),
chosen per input; off by default: on the held-out domains it did not win on all three test models
(docs/QUALITY.md, 2026-12-01, fourth round).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import read_text
from ..quant import QUANT_FORMATS, PackedWeight, packed_shapes, quantize
from .calibrate import load_matrix

INT4_CANDIDATES = (("int4_sym", 128), ("int4_asym", 128), ("int4_sym", 64), ("int4_asym", 64), ("int4_sym", 32),
                   ("int4_asym_dq", 32), ("int4_asym", 32))
SENSITIVE_FORMAT = ("int8", 128)
UNIFORM_INT4 = ("int4_asym_dq", 32)
BITS_BUDGET = 4.6
SAMPLE_ROWS = 96
METHODS = ("rtn", "search", "gptq")
# (it gave them int8 at group 128, coarser than the rest's)
KEEP_SENSITIVE_INT8 = ("--keep-sensitive (keep_sensitive) keeps the N matrices of largest error at int8; with --quant "
                       "int8 every matrix is int8 already: leave it out")


@dataclass
class QuantOptions:
    method: str = "search"
    calib: str | None = None  # calibration text file for gptq; None: the built-in text (calibrate.py)
    calib_sequences: int = 32
    keep_sensitive: int = 0
    bits_budget: float | None = None  # --quant int4 only; None: BITS_BUDGET
    activation_scaling: bool = False  # AWQ-style per-channel scales before GPTQ (pyllm/convert/awq.py)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.keep_sensitive < 0:
            raise ValueError("--keep-sensitive must be >= 0")
        if self.bits_budget is not None and not 4.1 <= self.bits_budget <= 8.5:
            raise ValueError("--bits budget must be between 4.1 and 8.5 bits per weight")
        if self.calib_sequences < 1:
            raise ValueError("calibration needs at least one sequence")
        if self.activation_scaling and self.method != "gptq":
            raise ValueError("--awq needs calibration: --quant int4 and int8 calibrate unless --calib none or "
                             "--rtn is given; other int4 layouts need --calib builtin or --calib FILE")


BUILTIN_CALIBRATION = "builtin"
NO_CALIBRATION = "none"


QUANTIZED_NAMES = ("int8", "int4", "int4_sym", "int4_asym", "int4_asym_dq")


def options_from_flags(quant: str | None, calib: str | None, rtn: bool, keep_sensitive: int,
                       bits: float | None, group_size: int | None = None, awq: bool = False) -> QuantOptions:
    """The convert command's flags -> QuantOptions; a flag that would have no effect is refused
    (ValueError) rather than ignored.

    --calib FILE | builtin | none; unset: builtin for --quant int4 and int8, none otherwise. Without
    calibration int4 uses the scale search (--rtn: round-to-nearest), int8 min/max scales."""
    if quant not in QUANTIZED_NAMES:
        given = [flag for flag, value in (("--group-size", group_size), ("--rtn", rtn or None),
                                          ("--keep-sensitive", keep_sensitive or None), ("--bits", bits),
                                          ("--awq", awq or None),
                                          ("--calib", None if calib in (None, NO_CALIBRATION) else calib))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --quant int8 and "
                             f"int4 only (this conversion: {'--quant ' + quant if quant else 'no --quant'})")
    if keep_sensitive and quant == "int8":
        raise ValueError(KEEP_SENSITIVE_INT8)
    if bits is not None and quant != "int4":
        raise ValueError(f"--bits is the budget of --quant int4's per-matrix layouts; --quant {quant} has one layout")
    if calib is None:
        calib = BUILTIN_CALIBRATION if quant in ("int4", "int8") and not rtn else NO_CALIBRATION
    if calib != NO_CALIBRATION and rtn:
        raise ValueError("--calib and --rtn exclude each other")
    method = "rtn" if rtn else "search" if calib == NO_CALIBRATION else "gptq"
    return QuantOptions(method=method, calib=calib if method == "gptq" and calib != BUILTIN_CALIBRATION else None,
                        keep_sensitive=keep_sensitive, bits_budget=bits, activation_scaling=awq)


@dataclass
class Strategy:
    method: str
    formats: dict[str, tuple[str, int]] = field(default_factory=dict)  # layouts chosen per matrix
    done: dict[str, PackedWeight] = field(default_factory=dict)  # matrices already quantized (gptq)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase: calibration, layouts, GPTQ
    record: dict = field(default_factory=dict)  # how the matrices were quantized, stored in the file (pyllm.source)
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # activation-aware scales per input (awq.py)

    def quantize(self, base: str, w: np.ndarray, fmt: str, group: int) -> PackedWeight:
        """w f32 [rows, cols] -> the stored weight of matrix `base`."""
        if base in self.done:
            return self.done.pop(base)
        return quantize(w, fmt, group, search=self.method != "rtn" and fmt != "int8")


def bits_per_weight(fmt: str, group: int, rows: int, cols: int) -> float:
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}
    total = sum(sizes[dtype] * int(np.prod(shape)) for dtype, shape in packed_shapes(fmt, rows, cols, group).values())
    return 8.0 * total / (rows * cols)


def uniform_fits(linears: dict[str, tuple[int, int]]) -> bool:
    """Whether UNIFORM_INT4 on every matrix (base -> (rows, cols)) stays within BITS_BUDGET."""
    size = sum(rows * cols for rows, cols in linears.values())
    bits = sum(bits_per_weight(*UNIFORM_INT4, rows, cols) * rows * cols for rows, cols in linears.values())
    return bits <= BITS_BUDGET * size


def int4_choices(group: int, fixed_group: bool) -> list[tuple[str, int]]:
    """The layouts --quant int4 chooses among: INT4_CANDIDATES, or only those at an explicit group size."""
    if not fixed_group:
        return list(INT4_CANDIDATES)
    return [("int4_sym", group), ("int4_asym_dq", group), ("int4_asym", group)]


def plan_quantization(source, config, quant: str | None, fmt: str | None, group: int, options: QuantOptions,
                      progress: bool = True, log=sys.stderr, fixed_group: bool = False) -> Strategy:
    """The layout of every linear matrix (and for gptq the quantized matrices).

    fixed_group: the caller gave the group size explicitly; every layout keeps it."""
    strategy = Strategy(options.method)
    if fmt not in QUANT_FORMATS:
        return strategy
    linears = {b: s for b, s in config.linear_shapes().items() if b not in ("model.embed_tokens", "lm_head")}
    hessians = None
    clock = time.perf_counter()
    if options.method == "gptq":
        from .calibrate import Calibration
        from .pipeline import src_name

        text = _read_text(options.calib)
        key = (src_name(source), text, options.calib_sequences)
        if _LAST_CALIBRATION.get("key") != key:  # converting one model twice reuses its Hessians
            _LAST_CALIBRATION.clear()
            _LAST_CALIBRATION.update(key=key, value=Calibration(source, config, text, options.calib_sequences,
                                                                progress=progress, log=log))
        hessians = _LAST_CALIBRATION["value"]
        strategy.seconds["calibration"], clock = time.perf_counter() - clock, time.perf_counter()
    uniform = (quant == "int4" and not fixed_group and options.bits_budget is None and not options.keep_sensitive
               and uniform_fits(linears))
    if uniform:
        strategy.formats = {base: UNIFORM_INT4 for base in linears}
    elif quant == "int4" or options.keep_sensitive:
        if quant == "int8":
            raise ValueError(KEEP_SENSITIVE_INT8)
        layouts = int4_choices(group, fixed_group) if quant == "int4" else [(fmt, group)]
        sensitive = ("int8", group) if fixed_group else SENSITIVE_FORMAT
        strategy.formats = allocate(source, linears, {b: layouts for b in linears}, options, hessians,
                                    sensitive=sensitive, progress=progress, log=log)
        strategy.seconds["layouts"], clock = time.perf_counter() - clock, time.perf_counter()
    # int8 never uses the scale search (see the module's docstring): without calibration it is round-to-nearest
    strategy.record = {"method": "rtn" if options.method == "search" and fmt == "int8" else options.method}
    if quant == "int4" or options.keep_sensitive:
        strategy.record["bits_budget"] = options.bits_budget or BITS_BUDGET
    if quant == "int4":
        strategy.record["layouts"] = "uniform" if uniform else "per matrix"
    if hessians is not None:
        from .gptq import DAMPING, gptq_model

        strategy.record.update(damping=DAMPING, calibration="builtin" if options.calib is None else "file",
                               calibration_windows=hessians.domain_counts())

        formats = {b: strategy.formats.get(b, (fmt, group)) for b in linears}
        if options.activation_scaling:
            from .awq import ScaledHessians, ScaledSource, choose_scales

            clock = time.perf_counter()
            strategy.scales, alphas = choose_scales(source, config, hessians, formats, progress, log)
            strategy.record["activation_scaling"] = alphas
            source, hessians = ScaledSource(source, config, strategy.scales), ScaledHessians(hessians, strategy.scales)
            strategy.seconds["activation scales"], clock = time.perf_counter() - clock, time.perf_counter()
        strategy.done = gptq_model(lambda base: load_matrix(source.load, base, linears[base]), hessians, formats,
                                   progress, log)
        strategy.seconds["GPTQ"] = time.perf_counter() - clock
    return strategy


_LAST_CALIBRATION: dict = {}


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    # a non-UTF-8 file was the codec's bare "'utf-8' codec can't decode byte 0xff ...", naming no file
    try:
        text = read_text(path, ValueError)  # (bounded; a leading byte-order mark is no text)
    except OSError as e:
        raise ValueError(f"calibration file {path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # "PATH is not UTF-8 text (byte N: reason)", "PATH holds more than ..."
        raise ValueError(f"calibration file {e}") from None
    if not text.strip():
        raise ValueError(f"calibration file {path} is empty")
    return text


def relative_error(w: np.ndarray, h: np.ndarray | None, fmt: str, group: int) -> float:
    """Relative output error of w f32 [rows, cols] in (fmt, group) with the scale search;
    h [cols, cols] the input second moments (None: the identity, i.e. relative weight error)."""
    importance = None if h is None else np.diag(h).astype(np.float32)
    d = (quantize_dequantize(w, fmt, group, importance) - w).astype(np.float64)
    w64 = w.astype(np.float64)
    if h is None:
        return float(np.sum(d * d) / max(np.sum(w64 * w64), 1e-30))
    return float(np.sum((d @ h) * d) / max(np.sum((w64 @ h) * w64), 1e-30))


def quantize_dequantize(w, fmt, group, importance=None):
    from ..quant import dequantize

    return dequantize(quantize(w, fmt, group, search=True, importance=importance))


def _layout_errors(task: tuple[str, np.ndarray]) -> tuple[str, list]:
    """(base, sampled row indices) -> (base, [(bits per weight, relative error, layout)] per candidate)."""
    from .workers import shared

    from .pipeline import naming_the_tensor

    base, rows_sampled = task
    job = shared()
    rows, cols = job["linears"][base]
    sample = load_matrix(job["load"], base, (rows, cols))[rows_sampled]
    h = None if job["hessians"] is None else job["hessians"].input_hessian(base)
    with naming_the_tensor(job["where"](base + ".weight")):  # (a bare ValueError came out of the workers)
        return base, [(bits_per_weight(f, g, rows, cols), relative_error(sample, h, f, g), (f, g))
                      for f, g in job["choices"][base]]


def allocate(source, linears: dict, choices: dict, options: QuantOptions, hessians=None,
             sensitive: tuple[str, int] = SENSITIVE_FORMAT, progress: bool = False,
             log=sys.stderr) -> dict[str, tuple[str, int]]:
    """Layout per matrix: greedy upgrades by error saved per extra bit while under the budget, then
    the keep_sensitive matrices of largest error at `sensitive`. Measuring the layouts' errors (a
    progress bar per matrix) is the slow part."""
    from ..progress import progress_bar
    from .workers import forked_map

    rng = np.random.default_rng(0)
    budget = options.bits_budget or BITS_BUDGET
    tasks = [(base, np.sort(rng.choice(rows, size=min(rows, SAMPLE_ROWS), replace=False)))
             for base, (rows, cols) in linears.items()]  # drawn here, in order: the same rows however the work is split
    table = {}  # base -> list of (bits, error, layout), by bits
    bar = progress_bar(len(tasks), "choosing layouts", "matrix", progress, log)
    try:
        from .pipeline import where

        for base, options_here in forked_map(_layout_errors, tasks, dict(load=source.load, linears=linears,
                                                                        choices=choices, hessians=hessians,
                                                                        where=lambda name: where(source, name))):
            table[base] = sorted(options_here)
            bar.update(1)
    finally:
        bar.close()
    table = {base: table[base] for base in linears}
    pick = {base: 0 for base in table}
    size = {base: rows * cols for base, (rows, cols) in linears.items()}
    total_size = sum(size.values())
    spent = sum(table[b][0][0] * size[b] for b in table)
    if len(choices[next(iter(choices))]) > 1 and spent > budget * total_size * (1 + 1e-9):
        if options.bits_budget is None:  # the default budget, below what the layouts allowed can reach
            # (a model of rows not a multiple of 32 values reached 5.35 bits per weight without a word)
            print(f"note: the smallest layouts these matrices take ({spent / total_size:.2f} bits per weight: rows "
                  f"whose lengths no int4 group divides take larger ones) exceed the {budget} bits per weight "
                  "of --quant int4's budget", file=log)
            budget = spent / total_size
        else:
            raise ValueError(f"a budget of {budget} bits per weight is below the smallest layouts "
                             f"({spent / total_size:.3f} bits per weight)")
    while len(choices[next(iter(choices))]) > 1:
        best = None
        for base, opts in table.items():
            bits0, err0, _ = opts[pick[base]]
            for k in range(pick[base] + 1, len(opts)):
                bits1, err1, _ = opts[k]
                extra = (bits1 - bits0) * size[base]
                if err1 >= err0 or spent + extra > budget * total_size:
                    continue
                gain = (err0 - err1) / max(extra, 1e-9)
                if best is None or gain > best[0]:
                    best = (gain, base, k, extra)
        if best is None:
            break
        _, base, k, extra = best
        pick[base] = k
        spent += extra
    layouts = {base: table[base][pick[base]][2] for base in table}
    by_error = sorted(table, key=lambda b: -table[b][pick[b]][1])
    for base in by_error[:options.keep_sensitive]:
        layouts[base] = sensitive
    return layouts
