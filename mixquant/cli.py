"""The `mixquant` command line: one subcommand per pipeline stage."""

import argparse
import math
import signal
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import __version__
from .errors import MixquantError


def _cmd_fixture(args: argparse.Namespace) -> int:
    from .testdata import TEST_MODELS, build_test_text

    model = TEST_MODELS[args.model].build(force=args.force)
    calib, evaluation = build_test_text(force=args.force)
    print(f"test model:       {model}")
    print(f"calibration text: {calib}")
    print(f"evaluation text:  {evaluation}")
    return 0


def _cmd_formats(args: argparse.Namespace) -> int:
    """Quantize one block's real tensors to each format; print bits per weight, error and speed."""
    from . import formats
    from .source import open_source
    from .testdata import build_test_model

    _check_at_least(args, threads=1, layer=0)
    codecs = [formats.get(name) for name in (args.types.split(",") if args.types else formats.FORMATS)]
    with open_source(args.model or build_test_model()) as source:
        tensors = {t.name: source.tensor(t.name) for t in source.model.tensors
                   if t.name.startswith(f"blk.{args.layer}.") and len(t.shape) == 2}
    if not tensors:
        raise MixquantError(f"{args.model}: no 2-D tensors in block {args.layer}")
    print(f"block {args.layer}: {', '.join(tensors)}")
    print(f"{'type':8} {'bits/w':>7} {'tensors':>8} {'rel. RMS error':>15} {'MB/s':>8}")
    for codec in codecs:
        usable = [w for w in tensors.values() if w.shape[1] % codec.block_size == 0]
        if not usable:
            print(f"{codec.name:8} {codec.bits_per_weight:7.3f} {0:8d}  (no tensor here fits its block size)")
            continue
        formats.quantize(usable[0][:1], codec.name)  # compile the kernel before timing it
        err = ref = seconds = 0.0
        for w in usable:
            start = time.perf_counter()
            data = formats.quantize(w, codec.name, threads=args.threads)
            seconds += time.perf_counter() - start
            err += float(np.sum((formats.dequantize(data, codec.name, w.shape) - w).astype(np.float64) ** 2))
            ref += float(np.sum(w.astype(np.float64) ** 2))
        mbytes = sum(w.nbytes for w in usable) / 1e6
        print(f"{codec.name:8} {codec.bits_per_weight:7.3f} {len(usable):8d} {np.sqrt(err / ref):15.4%} {mbytes / seconds:8.1f}")
    return 0




def _check_at_least(args: argparse.Namespace, **minimums: int) -> None:
    """One-line errors for counts below their minimum (None: not given, the default applies)."""
    for name, least in minimums.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise MixquantError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


def _check_positive_finite(args: argparse.Namespace, *names: str) -> None:
    """One-line errors for a real number that is not finite and positive (inf, nan, 0, -1)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise MixquantError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")


@contextmanager
def _output_folder(path: str) -> Iterator[Path]:
    """The output folder, created if needed; one this run created is removed again if the run
    fails before writing anything into it."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise MixquantError(f"{out}: exists and is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MixquantError(f"{out}: cannot create the folder: {exc.strerror or exc}") from None
    try:
        yield out
    except BaseException:
        if created:
            with suppress(OSError):  # only while still empty
                out.rmdir()
        raise


def _parse_size(text: str) -> int:
    from .runtime import parse_size

    return parse_size(text, "--target-size")


_TARGETS = {"target_bpw": "--target-bpw", "target_size": "--target-size", "max_kld": "--max-kld"}


def _rules(args: argparse.Namespace):
    """--tensor-type's rules in front of --recipe's (first match wins, so --tensor-type overrides)."""
    from .recipe import Recipe, load_recipe

    overrides = Recipe.from_tensor_types(args.tensor_type)
    return overrides if args.recipe is None else overrides.then(load_recipe(args.recipe))


# calibration windows of 512 tokens for an imatrix computed on the fly (mixquant analyze's default)
_ON_THE_FLY_CHUNKS = 64


def _read_sensitivity(args: argparse.Namespace, source, allocating: bool):
    """--sensitivity's file (None without one), checked against the model.

    An allocation refuses a sensitivity measured with another rounding than the one --method writes
    (`_allocated_rounding`): its damages are those of the other method's bytes (files without the
    field are rtn's). Its GPTQ options are checked by `_gptq_options`."""
    from .analyze import Sensitivity

    if not args.sensitivity:
        return None
    sens = Sensitivity.load(args.sensitivity)
    sens.check_model(source.model, args.sensitivity)
    measured, rounding = sens.settings.get("method", "rtn"), _allocated_rounding(args.method)
    if allocating and measured != rounding:
        writes = f"--method {args.method}" + (f" (allocated on {rounding} damages)" if rounding != args.method
                                              else "")
        raise MixquantError(f"{args.sensitivity}: measured with --method {measured}, but this allocation writes "
                            f"{writes}; give --method {measured}, or analyse with --method {rounding}")
    return sens


def _sensitivity(args: argparse.Namespace, source, imatrix, hessians=None, gptq_options=None):
    """(sensitivity, imatrix) for an allocation without --sensitivity: --text analysed on the fly as
    `mixquant analyze` would (calibrating an imatrix there too unless --imatrix gives one), with
    --method's rounding (gptq: through `hessians`, with the `gptq_options` the file is written with)."""
    from .analyze import analyze
    from .calibrate import calibrate
    from .text import read_text

    if not args.text:
        raise MixquantError(f"{'/'.join(_TARGETS.values())} need --sensitivity FILE (from mixquant analyze) "
                            "or --text CALIB.txt")
    progress = sys.stderr.isatty()
    try:
        if imatrix is None and source.hf_folder is not None:
            imatrix = calibrate(source.hf_folder, read_text(args.text), chunks=_ON_THE_FLY_CHUNKS, progress=progress,
                                dataset=str(args.text), activations=False, output_importance=True,
                                **_runtime(args)).imatrix
            print(f"imatrix: calibrated on {imatrix.chunks} chunks of {args.text}", file=sys.stderr)
        gptq = _allocated_rounding(args.method) == "gptq"
        sens = analyze(source, imatrix, text=args.text, fisher=True, threads=args.threads, progress=progress,
                       method=_allocated_rounding(args.method), hessians=hessians if gptq else None,
                       gptq_options=gptq_options if gptq else None, **_runtime(args))
    except MixquantError as exc:
        raise MixquantError(f"analysing --text {args.text} on the fly: {exc}") from None
    return sens, imatrix


def _allocated_rounding(method: str) -> str:
    """The rounding an allocation for `method` is measured with: the method itself, except that AWQ's
    scales depend on the plan, so awq allocates on rtn damages and awq+gptq on gptq damages, and the
    scales are then searched for the allocated plan (its search keeps s = 1 where no scale lowers the
    error)."""
    return {"awq": "rtn", "awq+gptq": "gptq"}.get(method, method)


def _allocated_plan(args: argparse.Namespace, source, sens):
    """The plan that minimises predicted damage within --target-bpw/--target-size, or the smallest
    one within --max-kld; --recipe and --tensor-type pin the tensors their rules give a type."""
    from .allocate import allocate
    from .export import gguf_file_size
    from .plan import preset_plan

    budget: dict = {}
    if args.target_bpw is not None:
        budget["bpw"] = args.target_bpw
    elif args.max_kld is not None:
        budget["max_damage"] = args.max_kld
    else:
        f32 = preset_plan(source.model, "F32")
        budget["file_bytes"] = _parse_size(args.target_size)
        budget["overhead"] = gguf_file_size(source, f32) - f32.total_bytes - 31 * len(f32.types)
    result = allocate(sens, pinned=_rules(args).pins(source.model), **budget)
    print(f"allocation: {result}", file=sys.stderr)
    return result.plan


def _predicted(sens, plan) -> tuple[dict[str, float], str]:
    """Each tensor's predicted damage, and "predicted KLD X" for their sum."""
    from .allocate import plan_damage

    damage = plan_damage(sens, plan)
    known = [x for x in damage.values() if x == x]
    # measure="none": nothing was run through the model, the damage is the weighted error, not a KLD
    label = "predicted error" if sens.settings.get("measure") == "none" else "predicted KLD"
    missing = f" (and {len(damage) - len(known)} tensors whose type was not analysed)" if len(known) < len(damage) else ""
    return damage, f"{label} {sum(known):.5g}{missing}"


def _cmd_quantize(args: argparse.Namespace) -> int:
    """llama-quantize's interface: SRC OUT.gguf TYPE, per-tensor plan from the preset and overrides;
    or a recipe's plan; or a size (--target-bpw/--target-size) and the plan that loses least within
    it, or the smallest plan within a loss (--max-kld)."""
    from .export import gguf_file_size, write_gguf
    from .files import check_output
    from .plan import preset_plan
    from .source import open_source

    _check_positive_finite(args, "target_bpw", "max_kld")
    _check_at_least(args, threads=1)
    targets = [flag for key, flag in _TARGETS.items() if getattr(args, key) is not None]
    if len(targets) > 1:
        raise MixquantError(f"give only one of {', '.join(targets)}")
    if (args.type is None) == (not targets and args.recipe is None):
        raise MixquantError(f"give either a preset/type, or --recipe and/or one of {'/'.join(_TARGETS.values())}")
    if args.type is None and (args.pure or args.output_tensor_type or args.token_embedding_type
                              or args.leave_output_tensor):
        raise MixquantError("--pure, --output-tensor-type, --token-embedding-type and --leave-output-tensor go "
                            "with a preset; with --recipe or a target, use --tensor-type")
    gptq = args.method in ("gptq", "awq+gptq")
    awq = args.method in ("awq", "awq+gptq")
    _refuse_gptq_flags(args, gptq, "--method gptq or awq+gptq")
    if args.text and not targets and not (gptq or awq):
        raise MixquantError("--text is analysed on the fly for a target only; for a plan's predicted KLD give "
                            "--sensitivity")
    if args.hessians and not (gptq or awq):
        raise MixquantError("--hessians goes with --method gptq, awq or awq+gptq")
    if (gptq or awq) and not (args.hessians or args.text):
        raise MixquantError(f"--method {args.method} needs --hessians FILE (mixquant imatrix --hessians, mixquant "
                            "analyze) or --text CALIB.txt to calibrate on the fly")
    if args.awq_grid < 1:
        raise MixquantError(f"--awq-grid must be at least 1, got {args.awq_grid}")
    imatrix = _read_imatrix_arg(args.imatrix)
    with open_source(args.src, allow_requantize=args.allow_requantize) as source:
        _check_imatrix(imatrix, source.model, args.imatrix)
        if not args.dry_run:  # before any long work: the output path is usable and overwrites no input
            check_output(args.out, [source.path, args.imatrix, args.sensitivity, args.text, args.recipe,
                                    args.hessians])
        sens = _read_sensitivity(args, source, allocating=bool(targets))
        options = _gptq_options(args, sens if targets and _allocated_rounding(args.method) == "gptq" else None) \
            if gptq or awq else None
        quantizer = hessians = None
        if (gptq or awq) and not args.dry_run:
            quantizer, hessians, imatrix = _gptq_quantizer(args, source, imatrix, options)
        if sens is None and targets:
            sens, imatrix = _sensitivity(args, source, imatrix, hessians, options)
        if targets:
            plan = _allocated_plan(args, source, sens)
        elif args.recipe is not None:
            plan = _rules(args).plan(source.model)
        else:
            plan = preset_plan(source.model, args.type, pure=args.pure, output_type=args.output_tensor_type,
                               token_embedding_type=args.token_embedding_type, tensor_types=args.tensor_type,
                               has_imatrix=imatrix is not None, leave_output=args.leave_output_tensor)
        if plan.requires_imatrix and imatrix is None:
            print(f"warning: {len(plan.requires_imatrix)} tensors get types that are poor without an "
                  "importance matrix (--imatrix)", file=sys.stderr)
        damage, predicted = _predicted(sens, plan) if sens is not None else (None, "")
        if args.dry_run:
            size = gguf_file_size(source, plan, file_type=args.type)
            print(plan.table(damage))
            print(f"output file: {size:,} bytes ({size / 2**20:.2f} MiB), {plan.bits_per_weight:.3f} bits per weight"
                  f"{', ' + predicted if predicted else ''} (dry run: nothing written)")
            return 0
        if predicted and not targets:  # an allocation has said it already
            print(predicted, file=sys.stderr)
        importance = None if imatrix is None else imatrix.as_dict()
        written = source
        if awq:
            if targets:
                print(f"awq: the plan was allocated on {_allocated_rounding(args.method)} damages; the scales are "
                      "searched for it", file=sys.stderr)
            written, importance, quantizer = _awq(args, source, plan, hessians, importance, options)
        result = write_gguf(written, plan, args.out, importance=importance, threads=args.threads,
                            progress=sys.stderr.isatty(), file_type=args.type, quantizer=quantizer)
    if quantizer is not None:
        print(f"gptq: {quantizer.gptq_tensors} tensors rounded with error feedback, the rest round-to-nearest",
              file=sys.stderr)
    print(result)
    return 0


def _awq(args: argparse.Namespace, source, plan, hessians, importance, options):
    """--method awq / awq+gptq: the scales searched for this plan, and (the source with them folded
    in, the imatrix they imply, the quantizer: GPTQ on the scaled Hessians, or None)."""
    from .quantize.awq import prepare

    awq = prepare(source, dict(plan.types), hessians, importance, args.method, grid=args.awq_grid,
                  threads=args.threads, progress=sys.stderr.isatty(), gptq_options=asdict(options))
    print(awq.scales.summary(), file=sys.stderr)
    return awq.source, awq.importance, awq.quantizer


def _gptq_flags(p: argparse.ArgumentParser) -> None:
    """--gptq-order/-refit/-resweeps/-damp (`GptqOptions`; None where not given)."""
    p.add_argument("--gptq-order", choices=("natural", "act"),
                   help="gptq column order: natural (default): left to right, each block fitted when the sweep "
                        "reaches it; act: static groups, every block fitted first, columns by descending input "
                        "energy (lower KLD at Q4_K_M and Q3_K_M with natural, measured)")
    p.add_argument("--gptq-refit", action=argparse.BooleanOptionalAction,
                   help="gptq: afterwards refit each block's stored scales (float16 d/dmin, integer sub-block "
                        "scales and mins) given its codes, where that lowers the Hessian-weighted error "
                        "(default: on)")
    p.add_argument("--gptq-resweeps", type=int, metavar="N",
                   help="gptq with the refit: N more sweeps with the refitted scales frozen, each refitted "
                        "again, a row kept where its error went down (default 0)")
    p.add_argument("--gptq-damp", type=float, metavar="FRACTION",
                   help="gptq: damping added to H's diagonal, as a fraction of its mean (default 0.01)")


def _gptq_given(args: argparse.Namespace) -> dict[str, Any]:
    """The `GptqOptions` fields --gptq-order/-refit/-damp/-resweeps give (those not given left out)."""
    given = {"act_order": None if args.gptq_order is None else args.gptq_order == "act", "refit": args.gptq_refit,
             "damp": args.gptq_damp, "resweeps": args.gptq_resweeps}
    return {name: value for name, value in given.items() if value is not None}


def _refuse_gptq_flags(args: argparse.Namespace, rounds_with_gptq: bool, methods: str) -> None:
    """A --gptq-* flag where nothing is rounded with GPTQ is a mistake, not something to ignore."""
    given = [f"--{'no-' if v is False else ''}{k.replace('_', '-')}" for k, v in vars(args).items()
             if k.startswith("gptq_") and v is not None]
    if given and not rounds_with_gptq:
        raise MixquantError(f"{given[0]} goes with {methods}")


def _gptq_options(args: argparse.Namespace, sens=None):
    """GPTQ's options: the flags given, gptq's defaults for the rest; for an allocation on the gptq
    damages of `sens`, the options it was measured with (so the file holds the bytes they were
    measured on), refusing a flag that differs from them."""
    from .quantize import GptqOptions

    given = _gptq_given(args)
    if sens is None:
        return GptqOptions(**given)
    try:
        measured = GptqOptions.recorded(sens.settings)
    except MixquantError as exc:
        raise MixquantError(f"{args.sensitivity}: {exc}") from None
    wanted, had = GptqOptions(**given).flags(), measured.flags()  # a bad flag gets its own error first
    differ = [name for name, value in given.items() if value != getattr(measured, name)]
    if differ:
        raise MixquantError(f"{args.sensitivity}: measured with {' '.join(had[n] for n in differ)}, but this "
                            f"allocation writes {' '.join(wanted[n] for n in differ)}; leave "
                            f"{'them' if len(differ) > 1 else 'it'} out to write what was measured, or analyse "
                            f"with {' '.join(wanted[n] for n in differ)}")
    print(f"gptq: rounding as {args.sensitivity} was measured: {' '.join(had.values())}", file=sys.stderr)
    return measured


def _gptq_quantizer(args: argparse.Namespace, source, imatrix, options):
    """(HessianQuantizer or None, Hessians, imatrix) for --method gptq/awq/awq+gptq: --hessians FILE, or
    --text calibrated on the fly (which also gives the imatrix unless --imatrix did). The quantizer is
    --method gptq's (AWQ's comes with its scales); it checks the Hessians fit the model."""
    from .hessians import Hessians
    from .quantize import HessianQuantizer

    def made(hessians):
        quantizer = HessianQuantizer(hessians, source.model, **asdict(options), threads=args.threads or 1)
        return (quantizer if args.method == "gptq" else None), hessians

    if args.hessians:
        return *made(Hessians.load(args.hessians)), imatrix
    from .calibrate import calibrate
    from .text import read_text

    if source.hf_folder is None:
        raise MixquantError(f"{args.src}: calibrating Hessians needs a Hugging Face folder; give --hessians FILE")
    cal = calibrate(source.hf_folder, read_text(args.text), chunks=_ON_THE_FLY_CHUNKS, progress=sys.stderr.isatty(),
                    dataset=str(args.text), activations=False, output_importance=True, hessians=True,
                    **_runtime(args))
    print(f"hessians: calibrated on {cal.imatrix.chunks} chunks of {args.text}", file=sys.stderr)
    return *made(cal.hessians), imatrix if imatrix is not None else cal.imatrix


def _cmd_analyze(args: argparse.Namespace) -> int:
    """calibrate -> sensitivity -> report, each stage timed."""
    from . import formats
    from .analyze import DEFAULT_SWEEP_TYPES, analyze
    from .calibrate import ActivationStats, calibrate, read_imatrix, write_imatrix
    from .files import check_output
    from .report import write_report
    from .source import open_source
    from .text import read_text

    text = Path(args.text)
    if not text.is_file():
        raise MixquantError(f"{text}: no such text file")
    # ggml never collects micro-batches under 16 tokens (calibrate._MIN_UBATCH_TOKENS)
    _check_at_least(args, ctx=16, chunks=1, windows=1, threads=1)
    # types are checked before the long stages start
    types = [formats.get(t).name for t in args.types.split(",")] if args.types else None
    sweep = DEFAULT_SWEEP_TYPES if args.sweep_types is None else [
        formats.get(t).name for t in args.sweep_types.split(",") if t]
    gptq = args.method == "gptq"
    if args.hessians and not gptq:
        raise MixquantError("--hessians goes with --method gptq")
    _refuse_gptq_flags(args, gptq, "--method gptq")
    gptq_options = _gptq_options(args) if gptq else None
    if gptq and args.no_hessians and not args.hessians:
        raise MixquantError("--method gptq rounds with the Hessians this run calibrates: leave out --no-hessians, "
                            "or give --hessians FILE")
    progress = sys.stderr.isatty()
    timings: dict[str, float] = {}
    if args.ray and args.ray != "local":  # a cluster that does not answer fails now, not after calibration
        from .runtime.executor import ray_session

        with ray_session(args.ray):
            pass
    with open_source(args.src) as source, _output_folder(args.output) as out:
        if source.hf_folder is None:
            raise MixquantError(f"{args.src}: analyze needs a Hugging Face folder (it runs the model in PyTorch)")
        outputs = ["imatrix.gguf", "activations.json", "sensitivity.json"] + ([] if args.no_report else ["report.html"])
        for name in outputs:  # before the long work: none replaces an input or a special file
            check_output(out / name, [args.hessians])
        start = time.perf_counter()
        calibrate_hessians = not (args.no_hessians or args.hessians)
        saved = [out / "imatrix.gguf", out / "activations.json"] + ([out / "hessians.safetensors"]
                                                                    if calibrate_hessians else [])
        if args.resume and all(p.is_file() for p in saved):  # written whole (atomically) by the interrupted run
            imatrix, activations = read_imatrix(saved[0]), ActivationStats.load(saved[1])
            print(f"resuming: calibration read back from {out}")
        else:
            cal = calibrate(source.hf_folder, read_text(text), ctx=args.ctx, chunks=args.chunks, progress=progress,
                            dataset=str(text), output_importance=not args.no_output_importance,
                            hessians=calibrate_hessians, **_runtime(args))
            write_imatrix(cal.imatrix, saved[0])
            if cal.hessians is not None:
                cal.hessians.save(out / "hessians.safetensors")
            cal.activations.save(saved[1])
            imatrix, activations = cal.imatrix, cal.activations
            hess = "" if cal.hessians is None else f", hessians: {out / 'hessians.safetensors'}"
            print(f"imatrix: {saved[0]}, activations: {saved[1]}{hess} ({imatrix.chunks} chunks of {args.ctx} tokens)")
            del cal  # the Hessians are read back from the file, one matrix at a time, when gptq needs them
        timings["calibration (imatrix, activations)"] = time.perf_counter() - start
        hessians = (args.hessians or out / "hessians.safetensors") if gptq else None
        sens = analyze(source, imatrix, text=text, types=types,
                       n_windows=args.windows, fisher=not args.no_fisher, layer_sweep_types=sweep,
                       threads=args.threads, progress=progress, ray=args.ray, state_dir=out / ".measure",
                       resume=args.resume, method=args.method, hessians=hessians, gptq_options=gptq_options,
                       **_runtime(args))
        sens.save(out / "sensitivity.json")
        st = sens.settings
        timings.update({
            "sensitivity: reference pass": st["seconds_reference"],
            "sensitivity: Fisher": st["seconds_fisher"],
            "sensitivity: quantize, measure, sweep": st["seconds_measure"],
            "  of which quantize + predict": st["seconds_quantize"],
        })
        print(f"sensitivity: {out / 'sensitivity.json'} ({len(sens.names)} tensors, {st['measured_pairs']} of "
              f"{st['candidates']} pairs measured on {st['tokens']} tokens, {args.method} rounding)")
        if not args.no_report:
            start = time.perf_counter()
            report = write_report(out, sens, activations=activations, source=source, timings=timings)
            timings["report"] = time.perf_counter() - start
            print(f"report: {report}")
    print("stages:")
    for name, seconds in timings.items():
        print(f"  {name:<40} {seconds:8.1f} s")
    return 0


def _cmd_imatrix(args: argparse.Namespace) -> int:
    """llama-imatrix's job: mean squared input activation per column of every linear layer."""
    from .calibrate import calibrate, compute_imatrix, write_imatrix
    from .files import check_output
    from .source import open_source
    from .text import read_text

    _check_at_least(args, ctx=16)
    if args.chunks == 0:
        raise MixquantError("--chunks must be at least 1 (or -1: all of the text)")

    with open_source(args.src) as source:
        if source.hf_folder is None:
            raise MixquantError(f"{args.src}: imatrix needs a Hugging Face folder (it runs the model in PyTorch)")
        folder = source.hf_folder
    text = Path(args.text)
    if not text.is_file():
        raise MixquantError(f"{text}: no such text file")
    check_output(args.output, [folder, text])  # before the long work
    if args.hessians:
        check_output(args.hessians, [folder, text, args.output])
        cal = calibrate(folder, read_text(text), ctx=args.ctx, chunks=args.chunks, progress=sys.stderr.isatty(),
                        dataset=str(text), process_output=args.process_output, activations=False, hessians=True,
                        **_runtime(args))
        imatrix = cal.imatrix
    else:
        imatrix = compute_imatrix(folder, read_text(text), ctx=args.ctx, chunks=args.chunks,
                                  progress=sys.stderr.isatty(), dataset=str(text), process_output=args.process_output,
                                  **_runtime(args))
    path = write_imatrix(imatrix, args.output)
    print(f"{path}: {len(imatrix.names)} tensors, {imatrix.chunks} chunks of {args.ctx} tokens")
    if args.hessians:
        hpath = cal.hessians.save(args.hessians)
        print(f"{hpath}: {len(cal.hessians.rows)} Hessians, {hpath.stat().st_size / 2**20:,.0f} MiB")
    return 0


def _runtime_flags(p: argparse.ArgumentParser) -> None:
    """Where and within how much memory the model runs (mixquant.runtime)."""
    p.add_argument("--max-memory", metavar="SIZE", help="memory budget (e.g. 2GB, 800MiB; default: what the "
                   "machine has free): beyond it the model runs one block at a time, hidden states spill to disk")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="precision of the forward passes (float32, the default, is the reference)")


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime keywords of a stage from `_runtime_flags`' arguments."""
    from .runtime import parse_size

    budget = None if args.max_memory is None else parse_size(args.max_memory, "--max-memory")
    return {"max_memory": budget, "device": args.device, "dtype": args.dtype}


def _eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", required=True, help="evaluation text file (as llama-perplexity -f)")
    p.add_argument("--ctx", type=int, default=512, help="context size (llama-perplexity -c; default 512)")
    p.add_argument("--chunks", type=int, default=20,
                   help="windows to evaluate (llama-perplexity --chunks; default 20, -1: all)")
    p.add_argument("--imatrix", help="importance matrix (.gguf or .dat) used when quantizing plans")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--cpu-activations", action="store_true",
                   help="also round matmul inputs to 8 bits as llama.cpp's CPU backend does (predicts "
                        "llama-perplexity's own KLD); default: the weights' error alone")
    _runtime_flags(p)


def _read_imatrix_arg(path: str | None):
    if not path:
        return None
    from .calibrate import read_imatrix

    return read_imatrix(path)


def _check_imatrix(imatrix, model, path: str | None) -> None:
    if imatrix is not None:
        from .calibrate import check_imatrix

        check_imatrix(imatrix, model, path)


def _cmd_eval(args: argparse.Namespace) -> int:
    """PPL, KLD and top-1 of one GGUF file or plan against the float32 model."""
    import json

    from .evaluate import Evaluator, format_table

    _check_at_least(args, threads=1)
    if args.gguf and args.imatrix:
        raise MixquantError("--imatrix applies to --plan only (a GGUF file is already quantized)")
    imatrix = _read_imatrix_arg(args.imatrix)
    with Evaluator(args.src, args.text, ctx=args.ctx, chunks=args.chunks, threads=args.threads,
                   progress=sys.stderr.isatty(), cpu_activations=args.cpu_activations, **_runtime(args)) as ev:
        _check_imatrix(imatrix, ev.source.model, args.imatrix)
        if args.gguf:
            result = ev.evaluate_gguf(args.gguf)
        else:
            result = ev.evaluate_plan(args.plan, imatrix=imatrix)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(format_table([result]))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """Several GGUF files and/or presets against the same float32 reference: a table and a plot."""
    import json

    from .evaluate import Evaluator, check_items, format_table, plot_results
    from .files import check_output

    _check_at_least(args, threads=1)
    imatrix = _read_imatrix_arg(args.imatrix)
    if args.plot:
        check_output(args.plot)
    with Evaluator(args.src, args.text, ctx=args.ctx, chunks=args.chunks, threads=args.threads,
                   progress=sys.stderr.isatty(), cpu_activations=args.cpu_activations, **_runtime(args)) as ev:
        _check_imatrix(imatrix, ev.source.model, args.imatrix)
        check_items(args.items, ev.source.model, imatrix)
        results = []
        for item in args.items:
            results.append(ev.evaluate_item(item, imatrix=imatrix))
            r = results[-1]
            print(f"{r.label}: PPL {r.ppl:.4f}, mean KLD {r.kld_mean:.6f} ({r.seconds:.0f} s)", file=sys.stderr)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print(format_table(results))
    if args.plot:
        print(f"plot: {plot_results(results, args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _cmd_actquant(args: argparse.Namespace) -> int:
    """Activation quantization (W8A8, LLM.int8(), SmoothQuant) against float32: a table per scheme."""
    import json

    from .activations import actquant, format_table
    from .activations.report import write_actquant_report

    report = _output_folder(args.report) if args.report else None
    result = actquant(args.src, args.text, args.calib, schemes=args.schemes.split(",") if args.schemes else None,
                      weights=args.weights, bits=args.bits, ctx=args.ctx, chunks=args.chunks,
                      calib_chunks=args.calib_chunks, sensitivity=not args.no_sensitivity,
                      sensitivity_chunks=args.sensitivity_chunks, sensitivity_scheme=args.sensitivity_scheme,
                      target_kld=args.target_kld, imatrix=_read_imatrix_arg(args.imatrix), threads=args.threads,
                      progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps([r.to_dict() for r in result.rows], indent=1))
    else:
        print(format_table(result))
    if report:
        path = write_actquant_report(report, result)
        print(f"report: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixquant", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mixquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fixture", help="build the bundled test model and text into the cache")
    p.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2",
                   help="SmolLM2-135M-Instruct (default) or Gemma 3 270M")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_fixture)

    p = sub.add_parser("formats", help="quantize real tensors to each format: error and speed")
    p.add_argument("--model", help="Hugging Face folder or GGUF (default: the bundled test model)")
    p.add_argument("--layer", type=int, default=1, help="which block's tensors (default 1)")
    p.add_argument("--types", help="comma-separated types (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_formats)

    p = sub.add_parser("quantize", help="quantize a model to GGUF (llama-quantize compatible)")
    p.add_argument("src", help="Hugging Face folder or GGUF file")
    p.add_argument("out", help="output .gguf (written to a temporary name, renamed when complete)")
    p.add_argument("type", nargs="?", help="preset (Q4_K_M, Q5_K_S, ...) or a single type (Q8_0, ...); "
                   "leave out with --recipe, --target-bpw, --target-size or --max-kld")
    p.add_argument("--recipe", metavar="NAME|FILE",
                   help="per-tensor rules (shipped: classic, conservative, aggressive; or a YAML file, see "
                        "mixquant/recipe.py): the plan instead of a preset; with a target, the types it pins")
    p.add_argument("--target-bpw", type=float, help="allocate types for this many bits per weight")
    p.add_argument("--target-size", help="allocate types for this file size (bytes, or 80MB, 76MiB ...)")
    p.add_argument("--max-kld", type=float, metavar="X",
                   help="allocate the smallest plan whose predicted KLD (summed over tensors) is at most X")
    p.add_argument("--sensitivity", help="sensitivity.json from mixquant analyze: for the targets, and "
                   "the predicted KLD of any plan (per tensor in --dry-run)")
    p.add_argument("--text", help="calibration text: analyse on the fly (for a target without --sensitivity); "
                   "with --method gptq/awq/awq+gptq and no --hessians, the Hessians (and imatrix) are "
                   "calibrated on it")
    p.add_argument("--method", choices=("rtn", "gptq", "awq", "awq+gptq"), default="rtn",
                   help="rtn: llama-quantize's round-to-nearest (default, the same bytes); gptq: error-compensated "
                        "rounding inside the GGUF blocks with the inputs' Hessians; awq: per-channel scales "
                        "(mean|x|^alpha, searched on the Hessians) folded into the norms and v/up rows; "
                        "awq+gptq: both (with --target-*/--max-kld: allocated on rtn or gptq damages, the "
                        "scales then searched for the allocated plan)")
    p.add_argument("--hessians", metavar="FILE", help="hessians.safetensors (mixquant analyze, mixquant imatrix "
                   "--hessians) for --method gptq, awq, awq+gptq")
    p.add_argument("--awq-grid", type=int, default=20, metavar="N",
                   help="awq: alphas searched, 0, 1/N, ..., (N-1)/N (default 20)")
    _gptq_flags(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the per-tensor plan and size, write nothing")
    p.add_argument("--imatrix", help="importance matrix (llama-imatrix .gguf or legacy .dat)")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="override the type of tensors whose name matches PATTERN (repeatable; first match wins)")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="type of output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="type of token_embd.weight")
    p.add_argument("--leave-output-tensor", action="store_true", help="leave output.weight unquantized")
    p.add_argument("--pure", action="store_true", help="one type for every quantizable tensor, no mixing")
    p.add_argument("--allow-requantize", action="store_true", help="accept an already-quantized GGUF source")
    _runtime_flags(p)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("analyze", help="calibrate, measure per-tensor sensitivity, write a report (for allocation)")
    p.add_argument("src", help="the model's Hugging Face folder")
    p.add_argument("--text", required=True, help="calibration text file")
    p.add_argument("-o", "--output", required=True,
                   help="output folder: imatrix.gguf, activations.json, sensitivity.json, report.html, plots/")
    p.add_argument("--ctx", type=int, default=512, help="calibration window size (default 512)")
    p.add_argument("--chunks", type=int, default=64, help="calibration windows for the imatrix and statistics "
                   "(default 64)")
    p.add_argument("--windows", type=int, default=2, help="held-out windows (of 256 tokens, from the end of the "
                   "text) on which damage is measured (default 2)")
    p.add_argument("--types", help="candidate types, comma-separated (default: all)")
    p.add_argument("--sweep-types", help="types of the layer-by-layer sweep (default Q4_0,Q2_K; '' to skip)")
    p.add_argument("--no-fisher", action="store_true", help="skip the Fisher estimate")
    p.add_argument("--no-output-importance", action="store_true",
                   help="leave the tied output/token embedding out of the imatrix, as llama-imatrix does")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-hessians", action="store_true", help="skip hessians.safetensors (the inputs' sum x x^T "
                   "for quantize --method gptq: sum of cols^2 x 8 bytes, refused over 4 GiB)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="the rounding every candidate is measured with, as quantize --method writes it: rtn "
                   "(default) or gptq (with the Hessians this run calibrates, or --hessians, and the --gptq-* "
                   "options); quantize --target-* needs the same --method, and writes with the same --gptq-* options")
    p.add_argument("--hessians", metavar="FILE", help="for --method gptq: these Hessians instead of calibrating them")
    _gptq_flags(p)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the measurement as Ray tasks: on the cluster at ADDRESS (HOST:PORT or auto), or on a "
                   "local one when no address is given (pip install 'mixquant[ray]')")
    p.add_argument("--resume", action="store_true", help="continue an interrupted analysis in the same output "
                   "folder: finished work items (kept in OUTPUT/.measure) are not redone")
    _runtime_flags(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("imatrix", help="compute an importance matrix on calibration text (llama-imatrix compatible)")
    p.add_argument("src", help="the model's Hugging Face folder")
    p.add_argument("--text", required=True, help="calibration text file (as llama-imatrix -f)")
    p.add_argument("-o", "--output", default="imatrix.gguf", help="output: .gguf (default) or legacy .dat")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama-imatrix -c; default 512)")
    p.add_argument("--chunks", type=int, default=None, help="chunks to process (default: all)")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight (if not tied)")
    p.add_argument("--hessians", metavar="FILE", help="also write the inputs' Hessians (sum x x^T, float64) here "
                   "(safetensors; sum of cols^2 x 8 bytes: 808 MB for SmolLM2-135M), for quantize --method gptq")
    _runtime_flags(p)
    p.set_defaults(func=_cmd_imatrix)

    p = sub.add_parser("eval", help="perplexity, KL divergence and top-1 of a GGUF file or plan vs float32")
    p.add_argument("src", help="the model's Hugging Face folder (the float32 reference)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--gguf", help="a GGUF file of this model (written by mixquant or llama.cpp)")
    what.add_argument("--plan", help="a llama-quantize preset (Q4_K_M, ...) or a single type, quantized in memory")
    _eval_common(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="evaluate several GGUF files / presets: table and KLD-vs-size plot")
    p.add_argument("src", help="the model's Hugging Face folder (the float32 reference)")
    p.add_argument("items", nargs="+", metavar="ITEM", help="a GGUF file path or a preset/type name")
    _eval_common(p)
    p.add_argument("--plot", help="write a PNG of mean KLD against bits per weight here")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("actquant", help="quantize activations (W8A8, LLM.int8(), SmoothQuant): damage per scheme")
    p.add_argument("src", help="the model's Hugging Face folder (the float32 reference)")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--calib", required=True, help="calibration text for the static scales (not the evaluation text)")
    p.add_argument("--weights", default="none", metavar="none|Q8_0|per-channel-int8|PLAN",
                   help="weights as well: rounded in the forward pass, or a preset/type quantized with the GGUF "
                        "codecs (default none; LLM.int8() and SmoothQuant always get int8 weights)")
    p.add_argument("--bits", type=int, default=8, help="activation bits: 8 (default) or 4")
    p.add_argument("--schemes", help="comma-separated schemes (default: all, with the threshold and alpha sweeps)")
    p.add_argument("--ctx", type=int, default=512, help="window size (default 512)")
    p.add_argument("--chunks", type=int, default=2, help="evaluation windows (default 2)")
    p.add_argument("--calib-chunks", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the per-input sensitivity and allocation")
    p.add_argument("--sensitivity-scheme", default="minmax-sym", help="scheme of the sensitivity (default minmax-sym)")
    p.add_argument("--sensitivity-chunks", type=int, default=1, help="windows per sensitivity measurement (default 1)")
    p.add_argument("--target-kld", type=float, default=0.01, help="KLD the allocation must reach (default 0.01)")
    p.add_argument("--imatrix", help="importance matrix for a --weights plan")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--report", metavar="DIR", help="write actquant.html, actquant.json and plots/ here")
    p.set_defaults(func=_cmd_actquant)
    return parser


# arguments naming files or folders a command reads: no output may replace one
_INPUT_ARGS = ("src", "model", "text", "calib", "imatrix", "sensitivity", "recipe", "gguf", "items", "hessians")


def _note_inputs(args: argparse.Namespace) -> None:
    from .files import note_input

    for key in _INPUT_ARGS:
        value = getattr(args, key, None)
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and Path(path).expanduser().exists():
                note_input(path)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mixquant: warning: {_one_line(str(message))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (MixquantError) and the expected failures of the system (a file
    that cannot be read or written, no memory) are one line `mixquant: error: ...` and status 1; any
    other exception is a bug and shows its traceback."""
    import threading
    import warnings

    from .files import Terminated, command_inputs, handle_sigterm

    args = build_parser().parse_args(argv)
    previous_handlers = handle_sigterm() if threading.current_thread() is threading.main_thread() else {}
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        with command_inputs():
            _note_inputs(args)
            return args.func(args)
    except MixquantError as exc:
        print(f"mixquant: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permission denied, read-only file system, I/O error ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mixquant: error: {_one_line(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 1
    except MemoryError:
        print("mixquant: error: out of memory", file=sys.stderr)
        return 1
    except Terminated:
        print("mixquant: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("mixquant: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous_showwarning
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def run() -> None:
    """The `mixquant` program: main(), then exit; a signal arriving once the command is done (while
    the interpreter shuts down) changes nothing and is ignored."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
