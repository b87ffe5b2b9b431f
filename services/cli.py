"""``unigrpo`` command line.

Subcommands load and validate the config here, then dispatch lazily (import inside the handler) to the
module that does the work, so ``check-config`` and ``--help`` never import Ray or torch. Any config
problem (paths included, for the commands that start Ray) prints one line to stderr and exits 2, without a
traceback, before Ray starts. Ctrl-C / SIGTERM raise ``services.stop.Interrupted``: the command stops, a
local Ray cluster it started is shut down, and the process exits 128 + the signal number with one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_CONFIG = 2


class _NotAvailable(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _resolve(module: str, attr: str) -> Callable[..., Any]:
    """``module.attr``, or _NotAvailable when that module (not one of its imports) or attr is missing."""
    target = f"{module}.{attr}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        parts = module.split(".")
        own = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if e.name in own:
            raise _NotAvailable(target) from e
        raise
    fn = getattr(mod, attr, None)
    if fn is None:
        raise _NotAvailable(target)
    return fn


def _load(args: argparse.Namespace, check_paths: bool = False, uploaded_root: Path | None = None) -> Any:
    from services.config import load_config

    cfg = load_config(getattr(args, "config", None), getattr(args, "set", None) or [])
    if check_paths:
        cfg.check_paths(uploaded_root)
    return cfg


def _check_dir(flag: str, value: str | None) -> None:
    from services.config import ConfigError

    if value is not None and not Path(value).expanduser().exists():
        raise ConfigError(flag, f"path does not exist: {value}")


# ----------------------------------------------------------------------------------------- handlers
def _cmd_check_config(args: argparse.Namespace) -> int:
    from services.config import to_yaml

    cfg = _load(args, check_paths=args.check_paths)
    if args.estimate:
        from services.estimate import estimate_text

        try:
            sys.stdout.write(estimate_text(cfg, f"{cfg.run_name} (recipe {cfg.recipe}, model.arch {cfg.model.arch})"))
        except ValueError as e:
            _die(EXIT_CONFIG, str(e))
        return EXIT_OK
    sys.stdout.write(to_yaml(cfg))
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args, check_paths=True)
    train = _resolve("services.driver", "train")
    result = train(cfg, resume=args.resume)
    return result if isinstance(result, int) else EXIT_OK


def _cmd_submit(args: argparse.Namespace) -> int:
    from services.jobs import ROOT

    cfg = _load(args, check_paths=True, uploaded_root=ROOT)  # absolute paths name the cluster's disks
    submit = _resolve("services.jobs", "submit")
    result = submit(
        address=args.address, cfg=cfg, config_path=args.config, overrides=list(args.set or []), wait=args.wait
    )
    return result if isinstance(result, int) else EXIT_OK


def _cmd_scale(args: argparse.Namespace) -> int:
    scale = _resolve("services.scale", "scale")
    result = scale(run=args.run, rollout_workers=args.rollout_workers, address=args.address,
                   token_file=args.token_file)
    return result if isinstance(result, int) else EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args, check_paths=True)
    _check_dir("--checkpoint", args.checkpoint)
    _check_dir("--images", getattr(args, "images", None))
    run_eval = _resolve("services.evaluate", "run_eval")
    extra = {"images": args.images} if getattr(args, "images", None) else {}
    if getattr(args, "baseline", None):
        if not Path(args.baseline).is_file():
            raise SystemExit(f"eval: --baseline {args.baseline}: no such file")
        extra["baseline"] = args.baseline
    result = run_eval(cfg, checkpoint=args.checkpoint, benchmark=args.benchmark, out_dir=args.out, **extra)
    return result if isinstance(result, int) else EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args, check_paths=True)
    _check_dir("--checkpoint", args.checkpoint)
    serve = _resolve("services.serve_apps", "serve")
    result = serve(args.app, cfg, checkpoint=args.checkpoint, host=args.host, port=args.port)
    return result if isinstance(result, int) else EXIT_OK


def _cmd_seeds(args: argparse.Namespace) -> int:
    from services.config import ConfigError

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--seeds", f"{args.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError("--seeds", f"{args.seeds!r}: distinct integers >= 0, e.g. 0,1,2")
    cfg = _load(args, check_paths=True)  # a config error exits 2 before any run starts
    missing_seeds = _resolve("services.seeds", "missing_seeds")
    for flag, name in (("--against", args.against), ("--gather-only", cfg.run_name if args.gather_only else None)):
        missing = missing_seeds(name, seeds) if name else []
        if missing:
            raise ConfigError(flag, f"no runs/{name}-seed<S>/eval_final.json for seeds {missing}")
    run_seeds = _resolve("services.seeds", "run_seeds")
    run_seeds(args.config, cfg.run_name, seeds, list(args.set), Path(args.out), train=not args.gather_only,
              against=args.against)
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    _check_dir("--checkpoint", args.checkpoint)
    export = _resolve("services.export", "export")
    result = export(args.checkpoint, args.out)
    return result if isinstance(result, int) else EXIT_OK


def _cmd_degrade(args: argparse.Namespace) -> int:
    degrade_folder = _resolve("tasks.degrade", "degrade_folder")
    result = degrade_folder(args.in_dir, args.out_dir, types=args.types, seed=args.seed)
    if result is not None and not isinstance(result, int):
        print(result)
    return result if isinstance(result, int) else EXIT_OK


# ------------------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--config",
        required=required,
        metavar="FILE",
        help="YAML run config" + ("" if required else " (default: the embedded tiny CPU config)"),
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        help="override a field, e.g. --set rollout.group_size=8 (repeatable; values parsed as YAML)",
    )


def _add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show library warnings, log lines and progress bars (driver and Ray workers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unigrpo", description="RL (GRPO + Flow-GRPO) for unified multimodal models on Ray"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="run training (local Ray, or the cluster in RAY_ADDRESS)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint and MLflow run")
    _add_verbose_arg(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("submit", help="submit a training run as a Ray job")
    p.add_argument("--address", required=True, metavar="URL", help="Ray dashboard / Jobs API address")
    _add_config_args(p, required=True)
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    p.set_defaults(handler=_cmd_submit)

    p = sub.add_parser("scale", help="resize the rollout worker pool of a running run")
    p.add_argument("--run", required=True, help="run name (or MLflow run id)")
    p.add_argument("--rollout-workers", required=True, type=_positive_int, metavar="N")
    p.add_argument("--address", default=None, metavar="URL", help="Ray address (default: RAY_ADDRESS / auto)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="the run's owner token (default: $UNIGRPO_RUN_TOKEN, else <checkpoint.dir>/<run>/owner.token)")
    p.set_defaults(handler=_cmd_scale)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark")
    _add_config_args(p, required=True)
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--benchmark", choices=["degradation", "reconstruction"], default="degradation")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write results")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="reconstruction: a folder of images (default: the shapes eval split)")
    p.add_argument("--baseline", default=None, metavar="FILE",
                   help="degradation: an earlier eval JSON on the same items (e.g. runs/<run>/eval_stage1.json) "
                        "to pair against (exact McNemar, paired bootstrap)")
    _add_verbose_arg(p)
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("serve", help="Ray Serve HTTP app for the reward or the trained policy")
    p.add_argument("app", choices=["reward", "policy"])
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, metavar="DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_verbose_arg(p)
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser("seeds", help="train a config once per seed and tabulate its stage-2-vs-stage-1 evaluations "
                                     "(per seed, mean and spread)")
    _add_config_args(p)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--out", default="runs/seeds", metavar="DIR", help="where seeds.md and seeds.json go")
    p.add_argument("--against", default=None, metavar="RUN_NAME",
                   help="also pair each seed's final answers with run RUN_NAME-seed<S>'s on the same items "
                        "(an ablation against the default: --against clear-tiny)")
    p.add_argument("--gather-only", action="store_true",
                   help="tabulate the runs already trained (runs/<run_name>-seed<S>/eval_final.json); train nothing")
    p.set_defaults(handler=_cmd_seeds)

    p = sub.add_parser("export", help="write a checkpoint's policy as a self-contained directory (LoRA adapters "
                                      "merged into the base: lm/ and generator/ load with plain transformers / "
                                      "diffusers)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint or a saved policy directory")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("degrade", help="write degraded copies of a folder of images")
    p.add_argument("in_dir", metavar="IN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument(
        "--types", nargs="+", default=None, metavar="TYPE", help="corruption names (default: the whole suite)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_degrade)

    p = sub.add_parser("check-config", help="validate a config and print it resolved, as YAML")
    _add_config_args(p)
    p.add_argument("--check-paths", action="store_true", help="also check that model / data paths exist")
    p.add_argument("--estimate", action="store_true",
                   help="print parameter counts and the learner's memory per rank instead (meta device, no weights)")
    p.set_defaults(handler=_cmd_check_config)
    return parser


def _die(code: int, line: str) -> NoReturn:
    sys.stderr.write(" ".join(line.split()) + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _shutdown_ray() -> None:
    """Shut down the Ray this process started or joined (a local cluster's processes go with it)."""
    from services import stop

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with stop.ignored():
            ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services import console, stop
    from services.config import ConfigError, format_validation_error

    console.configure(verbose=getattr(args, "verbose", False))  # library noise off unless --verbose
    stop.install()
    try:
        code = args.handler(args)
    except (ConfigError, ValidationError) as e:
        _die(EXIT_CONFIG, format_validation_error(e))
    except _NotAvailable as e:
        _die(EXIT_FAIL, f"not available yet: {e.name}")
    except KeyboardInterrupt as e:
        _die(128 + stop.signum_of(e), str(e) or "interrupted")
    finally:
        _shutdown_ray()
    return code


if __name__ == "__main__":
    sys.exit(main())
