"""`scdd-ray` command line: flags generated from the schema, parsed into configurations, run.

The only module that knows flag names. Every flag is a schema field
(scdd_ray.schema): a recipe field `x` is `--x`, a stage field `recover.lr` is
`--recover-lr`, and a stage field whose name no other field has is also
`--name` (`--bn-coef` for `recover.bn_coef`). So one flag means one field in
every command, and the same table names the flag of a field in errors
(`scdd-ray: error: --flag: ...`, exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from . import methods, schema
from .bench.models import bench_models
from .bench.recover import bench_recover
from .bench.scaling import bench_scaling
from .bench.table import HLR_REFERENCES, TableSpec, cells, markdown, run_table, write_table
from .config import (
    build_config,
    check_run,
    field_types,
    flatten,
    parse_scale,
    read_config_file,
    recipe_fields,
    to_yaml,
    validate_recovery_grid,
)
from .dist.cluster import handle_sigterm, reset_sigterm, shutdown, sigterm_received
from .dist.tune import run_sweep
from .errors import ConfigError, ScddError, Terminated
from .pipeline import distill
from .pipeline.inspect import inspect_bn
from .pipeline.outdir import check_only_holds
from .pipeline.posttrain import PosttrainRequest, prepare_posttrain
from .pipeline.posttrain import run as run_posttrain
from .pipeline.squeeze import run_squeeze
from .provenance import stamped
from .schema import SECTIONS
from .store.atomic import atomic_write_json
from .tune_config import read_tune_config

log = logging.getLogger("scdd_ray")
# The environment, not the program, is at fault: one line naming the path, not a traceback.
ANTICIPATED_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                         errno.EROFS}
GROUPS = ("data", "run", "squeeze", "recover", "posttrain", "ray")



class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        raise UsageError(message)


# --- fields and their flags -------------------------------------------------------------------

def _meta(key: str) -> dict:
    section, _, name = key.rpartition(".")
    cls = {"": schema.DistillConfig, **{s: type(getattr(schema.DistillConfig(), s)) for s in SECTIONS}}[section]
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata


def group_of(key: str) -> str:
    section, _, _ = key.rpartition(".")
    return section or _meta(key)["group"]


def recipe(*groups: str, but: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The recipe fields of `groups`, less `but`, plus `add`, in schema order."""
    return tuple(k for k in recipe_fields() if (group_of(k) in groups and k not in but) or k in add)


def _flag_names() -> dict[str, tuple[str, ...]]:
    """Recipe field -> its flags: the canonical one, then the short alias of a stage field whose name is unique."""
    keys = list(recipe_fields())
    bare = [k.rpartition(".")[2] for k in keys]
    out = {}
    for k, b in zip(keys, bare):
        canonical = "--" + k.replace(".", "-").replace("_", "-")
        unique = "." in k and bare.count(b) == 1
        out[k] = (canonical, "--" + b.replace("_", "-")) if unique else (canonical,)
    return out


FLAGS = _flag_names()


def shown_flag(key: str) -> str:
    """The flag a message names for recipe field `key`: its short alias when it has one."""
    return FLAGS[key][-1]


class _ListOf:
    """argparse type: comma-separated values of `kind`."""

    def __init__(self, kind: type):
        self.kind, self.__name__ = kind, f"comma-separated {kind.__name__} list"

    def __call__(self, text: str) -> tuple:
        try:
            vals = tuple(self.kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {self.kind.__name__}s (got {text!r})") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"expected at least one value (got {text!r})")
        return vals


def _scale(text: str):
    try:
        return parse_scale(text, "")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _add(group, flags: tuple[str, ...], dest: str, typ, meta: dict, shown) -> None:
    """One flag of type `typ` (a schema type), shown with the value it has unless given."""
    text = meta.get("help", "").replace("%", "%%")
    if shown is not dataclasses.MISSING and not meta.get("required"):
        text += f" [{_text(shown)}]"
    kw: dict = {"dest": dest, "default": argparse.SUPPRESS, "help": text, "required": bool(meta.get("required"))}
    inner = [a for a in getattr(typ, "__args__", ()) if a is not type(None)]
    base = inner[0] if len(inner) == 1 and getattr(typ, "__origin__", None) is not tuple else typ
    if meta.get("action"):
        kw["action"] = meta["action"]
    elif base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif getattr(base, "__origin__", None) is tuple:
        args = base.__args__
        if meta.get("nargs"):
            kw.update(nargs=meta["nargs"], metavar="PATH")
        elif args == (float, float):
            kw.update(type=_scale, metavar="LO,HI|none")
        else:
            kw.update(type=_ListOf(args[0]), metavar="A,B,...")
    else:
        kw.update(type=base, metavar=dest.rpartition(".")[2].removeprefix("opt:").upper())
    group.add_argument(*flags, **kw)


def _text(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


# --- commands ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """A subcommand: the recipe fields it takes as flags, its option dataclasses, and what it runs."""

    name: str
    help: str
    recipe: tuple[str, ...]
    options: tuple[type, ...]
    run: Callable[["Args"], int]


@dataclass
class Args:
    """What a command was given: recipe fields set by flags, its options, and its config file (if any)."""

    given: dict
    options: dict
    file: dict | None = None
    argv: tuple = ()  # the command line as given, recorded in what benchmarks write

    def opts(self, cls: type):
        return cls(**{f.name: self.options[f.name] for f in dataclasses.fields(cls) if f.name in self.options})

    def config(self, **fixed) -> schema.DistillConfig:
        """The configuration of a run (preset, file, flags, then `fixed`), field checks only."""
        return build_config({**self.given, **fixed}, self.file, run=False)


def _distill(a: Args) -> int:
    cfg = a.config()
    check_run(cfg)
    report = distill.run(distill.prepare(cfg))
    print(json.dumps({k: report[k] for k in ("method", "dataset", "ipc", "num_images", "top1", "teacher_top1",
                                             "recover_seconds", "posttrain_seconds")}))
    return 0


def _squeeze(a: Args) -> int:
    opts = a.opts(schema.SqueezeOptions)
    print(json.dumps(run_squeeze(a.config(), opts.out, opts.from_checkpoint)))
    return 0


def _posttrain(a: Args) -> int:
    if "teacher" not in a.given and not (a.file or {}).get("teacher"):
        raise ConfigError("teacher", "is required: the checkpoint that relabels the crops")
    req = PosttrainRequest(a.opts(schema.PosttrainOptions), a.given, a.file)
    result = run_posttrain(req, *prepare_posttrain(req))
    print(json.dumps({k: result[k] for k in ("dataset", "num_images", "num_workers", "top1", "posttrain_seconds")}))
    return 0


def _tune(a: Args) -> int:
    opts = a.opts(schema.TuneOptions)
    if opts.archs is not None or opts.methods is not None:  # before the file: a bad flag is named as the flag
        validate_recovery_grid(opts.archs or ("resnet18",), opts.methods or methods.RECOVERY_METHODS)
    if opts.max_concurrent is not None and opts.max_concurrent < 0:
        raise ConfigError("max_concurrent", f"must be a non-negative integer (got {opts.max_concurrent})")
    cfg = read_tune_config(opts.config, a.given,
                           {"archs": opts.archs, "methods": opts.methods, "max_concurrent": opts.max_concurrent})
    if opts.num_samples is not None and opts.num_samples < 1:
        raise ConfigError("num_samples", f"must be a positive integer (got {opts.num_samples})")
    cfg.base.split("val")  # the data must be there before Ray starts or anything is written (the objective)
    check_only_holds(opts.out, {"backbones", "tune", "best.json", "summary.md"}, "sweep")
    try:
        res = run_sweep(cfg, opts.out, num_samples=opts.num_samples)
    except ConnectionError as e:
        raise ConfigError("address", str(e)) from None
    if res is None:
        print("scdd-ray: the sweep stopped before every trial finished; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(json.dumps({k: {"val_top1": v["val_top1"], "test_top1": v["test_top1"], **v["config"]}
                      for k, v in res["best"].items()}))
    print(f"wrote {os.path.join(opts.out, 'best.json')} and {os.path.join(opts.out, 'summary.md')}", file=sys.stderr)
    return 0


def _inspect_bn(a: Args) -> int:
    o = a.opts(schema.InspectOptions)
    for field, p in (("json", o.json), ("plot", o.plot)):
        if p and os.path.isdir(p):
            raise ConfigError(field, f"{p} is a directory; give a file path")
    groups = inspect_bn([("backbone", list(o.backbone), o.label), ("compare", list(o.compare or ()), o.compare_label)],
                        o.json, o.plot, stamped({}, a.argv))
    for g in groups:
        s = g["summary"]
        print(json.dumps({"label": g["label"], "n": len(g["checkpoints"]),
                          **{k: (f"{v['mean']:.4g} +- {v['std']:.2g}" if v["mean"] is not None else None)
                             for k, v in s.items()}}))
    return 0


def _bench_scaling(a: Args) -> int:
    o = a.opts(schema.ScalingOptions)
    if min(o.workers) < 1:
        raise ConfigError("workers", f"each count must be >= 1 (got {_text(o.workers)})")
    _positive(o, "shards")
    try:
        res = bench_scaling(a.config(), list(o.workers), o.shards)
    except ConnectionError as e:
        raise ConfigError("address", str(e)) from None
    atomic_write_json(o.json, stamped(res, a.argv))
    print(json.dumps(res["results"]))
    return 0


def _bench_recover(a: Args) -> int:
    o = a.opts(schema.RecoverBenchOptions)
    _positive(o, "num_classes", "batch", "timed_iterations", "repeats")
    res = bench_recover(a.config(), num_classes=o.num_classes, batch=o.batch, iterations=o.timed_iterations,
                        threads=o.threads or os.cpu_count() or 1, repeats=o.repeats)
    atomic_write_json(o.json, stamped(res, a.argv))
    print(json.dumps({k: res[k] for k in ("arch", "width", "image_size", "batch", "threads", "img_iters_per_s",
                                          "reference_img_iters_per_s", "vs_reference")}))
    return 0


def _bench_models(a: Args) -> int:
    o = a.opts(schema.ModelsOptions)
    validate_recovery_grid(o.archs, o.methods)
    _positive(o, "threads")
    overrides = {**flatten(a.file or {}), **a.given}
    # Every cell's settings are checked before the first one starts (hours of work on a CPU).
    for arch in o.archs:
        for method in o.methods:
            check_run(build_config({**overrides, "arch": arch, "method": method, "out": o.work}))
    res = bench_models(list(o.archs), list(o.methods), work=o.work, threads=o.threads, overrides=overrides)
    atomic_write_json(o.json, stamped(res, a.argv))
    print(json.dumps([{k: r[k] for k in ("arch", "method", "step_img_iters_per_s", "teacher_top1", "top1")}
                      for r in res["results"]]))
    return 0


def _bench_table(a: Args) -> int:
    o = a.opts(schema.TableOptions)
    if any(m not in methods.METHODS for m in o.methods) or len(set(o.methods)) != len(o.methods):
        raise ConfigError("methods", f"must name some of {', '.join(methods.METHODS)}, once each "
                                     f"(got {_text(o.methods)})")
    if min(o.ipcs) < 1 or min(o.seeds) < 0:
        raise ConfigError("ipcs" if min(o.ipcs) < 1 else "seeds", "expected positive IPCs and non-negative seeds")
    try:
        i, n = (int(v) for v in o.part.split("/"))
    except ValueError:
        i, n = 0, 0
    if not 1 <= i <= n:
        raise ConfigError("part", f"expected i/n with 1 <= i <= n (got {o.part!r})")
    _positive(o, "full_epochs")
    if o.model_seed is not None and o.model_seed < 0:
        raise ConfigError("model_seed", f"must be a non-negative integer (got {o.model_seed})")
    if o.hlr_reference not in HLR_REFERENCES:
        raise ConfigError("hlr_reference", f"must be one of {', '.join(HLR_REFERENCES)} (got {o.hlr_reference!r})")
    overrides = {**flatten(a.file or {}), **a.given}
    spec = TableSpec(overrides.pop("dataset", schema.DistillConfig.dataset), o.work, o.methods, o.ipcs, o.seeds,
                     overrides, o.full_epochs, o.hlr, o.hlr_reference, o.model_seed)
    for method, ipc, seed in cells(spec):  # every cell's settings, before hours of work start
        spec.config(method, ipc, seed, os.path.join(o.work, "check"))
    table = run_table(spec, (i, n))
    if table is None:
        print(json.dumps({"part": o.part, "complete": False}))
        return 0
    write_table(stamped(table, a.argv), o.json, o.md)
    print(markdown(table), end="")
    return 0


def _positive(opts, *names: str) -> None:
    for n in names:
        v = getattr(opts, n)
        if not (isinstance(v, (int, float)) and v > 0):
            raise ConfigError(n, f"must be positive (got {v!r})")


_ALL = tuple(recipe_fields())
_FILE = (schema.ConfigFileOptions,)
_CELLS = ("out", "method", "ipc", "seed", "backbone", "num_workers", "posttrain_workers", "address")
COMMANDS = {c.name: c for c in (
    Command("distill", "squeeze, recover, relabel and post-train; writes OUT/report.json", _ALL, _FILE, _distill),
    Command("squeeze", "train a backbone (SSL + linear probe, or supervised)",
            recipe("data", "squeeze", add=("arch", "width", "seed", "num_gpus")), _FILE + (schema.SqueezeOptions,),
            _squeeze),
    Command("posttrain", "train a student on a distilled set with the teacher's soft labels",
            recipe("posttrain", add=("dataset", "data_dir", "seed", "teacher", "num_gpus", "posttrain_workers",
                                     "address")), (schema.ConfigFileOptions, schema.PosttrainOptions), _posttrain),
    Command("tune", "Ray Tune sweep of recover settings across recovery-model sizes", ("data_dir", "address"),
            (schema.TuneOptions,), _tune),
    Command("inspect-bn", "how much each BN layer's running statistics vary across channels", (),
            (schema.InspectOptions,), _inspect_bn),
    Command("bench scaling", "the same synthesis job on 1, 2, ... single-thread CPU actors",
            recipe("recover", add=("dataset", "data_dir", "image_size", "arch", "width", "address")),
            (schema.ScalingOptions,), _bench_scaling),
    Command("bench recover", "images x iterations per second of the production recover step",
            recipe("recover", but=("recover.iterations",), add=("dataset", "image_size", "arch", "width", "seed",
                                                                 "num_gpus")),
            (schema.RecoverBenchOptions,), _bench_recover),
    Command("bench models", "recover throughput and student top-1 per recovery-model size",
            recipe(*GROUPS, but=_CELLS + ("arch",), add=("seed", "ipc")), _FILE + (schema.ModelsOptions,),
            _bench_models),
    Command("bench table", "random vs sre2l vs scdd over IPCs and seeds under one teacher, with IOR and HLR",
            recipe(*GROUPS, but=_CELLS), (schema.ConfigFileOptions, schema.TableOptions), _bench_table),
)}


# --- the parser -------------------------------------------------------------------------------

def _option_flag(f: dataclasses.Field) -> tuple[str, ...]:
    return (f.metadata.get("flag") or "--" + f.name.replace("_", "-"),)


def add_command_args(p: argparse.ArgumentParser, cmd: Command, shown: dict | None) -> None:
    types = recipe_fields()
    groups = {}
    for key in cmd.recipe:
        g = group_of(key)
        if g not in groups:
            groups[g] = p.add_argument_group(g)
        _add(groups[g], FLAGS[key], key, types[key], _meta(key),
             (shown or {}).get(key, dataclasses.MISSING))
    for cls in cmd.options:
        g = p.add_argument_group(cmd.name.split(" ")[-1] + " options")
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
            _add(g, _option_flag(f), "opt:" + f.name, hints[f.name], f.metadata, default)


def build_parser(shown: dict | None = None) -> tuple[Parser, dict[str, argparse.ArgumentParser]]:
    """The parser, and the subparser of each command (by its COMMANDS name). `shown`: the recipe values
    `--help` shows (a dataset's preset); the schema's defaults otherwise."""
    ap = Parser(prog="scdd-ray", description="SC-DD dataset distillation, from a laptop CPU to a Ray cluster.")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    parsers: dict[str, argparse.ArgumentParser] = {}
    bench = None
    for name, cmd in COMMANDS.items():
        if name.startswith("bench "):
            if bench is None:
                bench = sub.add_parser("bench", help="measure production code paths and rank methods"
                                       ).add_subparsers(dest="bench", required=True, parser_class=Parser)
            p = bench.add_parser(name.split(" ", 1)[1], help=cmd.help, description=cmd.help)
        else:
            p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        add_command_args(p, cmd, shown if shown is not None else _schema_values())
        parsers[name] = p
    return ap, parsers


def _schema_values() -> dict:
    return {k: v for k, v in flatten(schema.DistillConfig().to_dict()).items()}


def _preset_values(argv: list[str]) -> dict | None:
    """For `--help`: the recipe values of the dataset (and scale, and config file) named before it."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--dataset", "--data-dir", "--config"):
        pre.add_argument(flag)
    pre.add_argument("--num-gpus", type=int)
    try:
        known, _ = pre.parse_known_args(argv)
        given = {k: v for k, v in (("dataset", known.dataset), ("data_dir", known.data_dir),
                                   ("num_gpus", known.num_gpus)) if v is not None}
        file = read_config_file(known.config) if known.config else None
        return flatten(build_config(given, file, run=False).to_dict())
    except (ScddError, SystemExit):
        return None


def _args(ns: argparse.Namespace, cmd: Command, argv: list[str] | tuple = ()) -> Args:
    values = vars(ns)
    given = {k: values[k] for k in cmd.recipe if k in values}
    options = {k[4:]: v for k, v in values.items() if k.startswith("opt:")}
    for cls in cmd.options:  # option values arrive as strings/tuples; their dataclass defaults fill the rest
        for f in dataclasses.fields(cls):
            if f.name in options and isinstance(options[f.name], list):
                options[f.name] = tuple(options[f.name])
    file = read_config_file(options["config"]) if options.get("config") and cmd.name != "tune" else None
    return Args(given, options, file, tuple(argv))


def _keys(file: dict) -> set[str]:
    """The dotted keys a config file sets (sections that are not mappings count as their own key)."""
    return {f"{k}.{j}" for k, v in file.items() if isinstance(v, dict) for j in v} | set(file)


def flag_namer(parser: argparse.ArgumentParser, cmd: Command, args: Args | None = None) -> Callable[[str], str | None]:
    """field -> the flag that sets it in this command (None: no flag; a key set only by the config file is
    named as that file's key)."""
    from_file = _keys(args.file or {}) - set(args.given) if args else set()
    options = {f.name: _option_flag(f)[0] for cls in cmd.options for f in dataclasses.fields(cls)}

    def name(field: str) -> str | None:
        if field in from_file:
            return f"{args.options.get('config')}: {field}"
        if field in cmd.recipe:
            return shown_flag(field)
        return options.get(field)
    return name


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shown = _preset_values(argv) if any(h in argv for h in ("-h", "--help")) else None
    parser, parsers = build_parser(shown)
    try:
        ns = parser.parse_args(argv)
    except UsageError as e:
        print(f"scdd-ray: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if ns.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    name = f"bench {ns.bench}" if ns.command == "bench" else ns.command
    cmd, args = COMMANDS[name], None
    previous = signal.getsignal(signal.SIGTERM)
    reset_sigterm()
    handle_sigterm()  # SIGTERM (a scheduler's stop) is handled as Ctrl-C, through Ray's own handlers too
    try:
        args = _args(ns, cmd, argv)
        if args.options.get("print_config"):  # the resolved configuration, and nothing written
            sys.stdout.write(to_yaml(args.config()))
            return 0
        return cmd.run(args)
    except ScddError as e:
        print(f"scdd-ray: error: {e.render(flag_namer(parsers[name], cmd, args))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # ray.get turns a Terminated into a plain KeyboardInterrupt
        if isinstance(e, Terminated) or sigterm_received():
            shutdown()  # its actors and workers stop with it, before the process exits
            print("scdd-ray: terminated (SIGTERM); finished work is kept, rerun the same command to resume",
                  file=sys.stderr)
            return 143
        print("scdd-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # the library names the paths it writes; this catches what writes beneath it
        if e.errno not in ANTICIPATED_OS_ERRORS:
            raise
        print(f"scdd-ray: error: {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
