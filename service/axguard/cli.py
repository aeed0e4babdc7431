"""The `axguard` command: `serve` runs the server; check, info, health talk to one.

Subcommands only parse arguments, build settings and call library functions.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from axguard_client.cli import add_client_commands

from .flag.verdict import DEFAULT_FAMILIES, EPSILON_GRID


def _model_args(parser: argparse.ArgumentParser) -> None:
    """The options that pick and describe the model (shared by serve, calibrate, evaluate)."""
    parser.add_argument("--config", type=Path,
                        default=Path(os.environ["AXGUARD_CONFIG_FILE"])
                        if os.environ.get("AXGUARD_CONFIG_FILE") else None,
                        help="YAML settings file (default: $AXGUARD_CONFIG_FILE)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", dest="model.source",
                       help="demo (default), torchvision:NAME, timm:NAME, "
                            "package.module:factory, torchscript:PATH or a TorchScript "
                            "file, or a torch.export .pt2 file")
    model.add_argument("--weights", dest="model.weights", type=Path,
                       help="state dict file: .safetensors, or a torch file loaded with "
                            "weights_only=True")
    model.add_argument("--classes", dest="model.classes", type=Path,
                       help="class names, one per line")
    model.add_argument("--num-classes", dest="model.num_classes", type=int)
    model.add_argument("--input-size", dest="model.input_size", type=int, nargs="+",
                       metavar="PIXELS", help="H [W] of the model's input")
    model.add_argument("--channels", dest="model.channels", type=int, choices=(1, 3))
    model.add_argument("--mean", dest="model.mean", type=float, nargs="+")
    model.add_argument("--std", dest="model.std", type=float, nargs="+")
    model.add_argument("--name", dest="model.name")
    model.add_argument("--model-version", dest="model.version")
    model.add_argument("--device", dest="model.device", help="cpu, cuda or cuda:N")
    model.add_argument("--views", dest="model.views", type=_split_methods,
                       help="test-time views the model is invariant to, for the views "
                            "evidence family: hflip, vflip, shift:DX:DY, rotate:DEG, scale:F")
    attr = parser.add_argument_group("attribution")
    attr.add_argument("--grad-cam-layer", dest="attribution.grad_cam_layer")
    parser.add_argument("--log-level", dest="log_level",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--set", dest="set_settings", action="append", default=[],
                        type=_setting, metavar="SECTION.NAME=VALUE",
                        help="any setting of the settings model, e.g. "
                             "--set batching.max_delay_ms=1 --set server.max_batch_items=64 "
                             "(VALUE is read as YAML; repeat for several)")


@functools.cache
def setting_paths() -> frozenset[str]:
    """Every dotted path of the settings model ("server.port", "log_level", …)."""
    from pydantic import BaseModel

    from .config import Settings

    paths: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{prefix}{name}.")
            else:
                paths.add(f"{prefix}{name}")

    walk(Settings, "")
    return frozenset(paths)


def _setting(text: str) -> tuple[str, Any]:
    """Parse --set's SECTION.NAME=VALUE; the path must be a setting (VALUE is YAML)."""
    import yaml

    path, sep, value = text.partition("=")
    path = path.strip()
    paths = setting_paths()
    if not sep or path not in paths:
        valid = ", ".join(sorted(paths))
        raise argparse.ArgumentTypeError(f"{text!r}: expected SECTION.NAME=VALUE with a "
                                         f"setting's path; valid paths: {valid}")
    return path, yaml.safe_load(value) if value.strip() else None


def _split_methods(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


def _split_floats(value: str) -> list[float]:
    try:
        return [float(v) for v in _split_methods(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {value!r}") from None



def _serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model over gRPC",
        description="Serve a model. Flags override AXGUARD_* variables, which override "
                    "the YAML config file.",
    )
    _model_args(serve)
    serve.add_argument("--methods", dest="attribution.default_methods", type=_split_methods,
                       help="comma-separated default methods (default saliency,deconvolution)")
    serve.add_argument("--calibration", dest="calibration",
                       help="calibration artifact (JSON); 'none' turns off the demo's bundled one")
    srv = serve.add_argument_group("server")
    srv.add_argument("--host", dest="server.host")
    srv.add_argument("--port", dest="server.port", type=int)
    srv.add_argument("--max-workers", dest="server.max_workers", type=int)
    srv.add_argument("--processes", dest="server.processes", type=int,
                     help="server processes sharing the port (default 1)")
    srv.add_argument("--engine-processes", dest="server.engine_processes", type=int,
                     help="engine processes beside the serving process (0: the engine runs "
                          "in it; default: chosen at start-up)")
    srv.add_argument("--grace-seconds", dest="server.grace_seconds", type=float,
                     help="on SIGTERM, seconds in-flight requests may finish (default 10)")
    srv.add_argument("--metrics-host", dest="metrics.host")
    srv.add_argument("--metrics-port", dest="metrics.port", type=int,
                     help="Prometheus /metrics port (default 9090; 0 picks a free one)")
    srv.add_argument("--feedback-key-file", dest="feedback.key_file", type=Path,
                     help="receipt keys ('<key id> <secret>' lines): turns on receipts and "
                          "the Feedback RPC")
    serve.set_defaults(handler=run_serve)


def _calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    cal = subparsers.add_parser(
        "calibrate", help="fit the likely-wrong flag on labelled images",
        description="Run the model over labelled images and write a calibration artifact.")
    _model_args(cal)
    cal.add_argument("--data", required=True,
                     help="DIR/<class name>/*.png|jpg, or builtin:digits (demo calibration split)")
    cal.add_argument("--out", type=Path, required=True, help="artifact path (JSON)")
    cal.add_argument("--pairs", "--methods", dest="pairs", default="default",
                     help="the CO (method, AX process) pairs offered to the risk model: "
                          "'default' (saliency,deconvolution with SUM), 'all' (six methods, "
                          "SUM and PRODUCT) or method:process pairs, e.g. saliency:sum "
                          "(--methods is the old name)")
    cal.add_argument("--families", default=",".join(DEFAULT_FAMILIES), type=_split_methods,
                     help="evidence families offered to the risk model (msp is always in): "
                          "logit, boundary, counterfactual, perturbation, views, co (default "
                          "all but views; views is added when --views names some)")
    cal.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILON_GRID),
                     type=_split_floats,
                     help="perturbation steps to pick from, each in (0, 1)")
    cal.add_argument("--folds", type=int, default=5, help="cross-fitting folds (default 5)")
    cal.add_argument("--repeats", type=int, default=2,
                     help="cross-fitting repeats with new folds (default 2)")
    cal.add_argument("--false-alarm-rate", type=float, default=0.05, dest="beta",
                     help="false-alarm mode: most share of correct predictions flagged "
                          "(default 0.05)")
    cal.add_argument("--target-error-recall", type=float, default=None, dest="recall",
                     help="error-recall mode: least share of wrong predictions flagged")
    cal.add_argument("--delta", type=float, default=0.05,
                     help="the promise holds with probability >= 1 - delta (default 0.05)")
    cal.add_argument("--max-cost", type=float, default=None,
                     help="most the verdict may add to a prediction, in plain forwards (a "
                          "backward counts 2): the families with the largest drop-one effect "
                          "that fit are kept (default: no bound, every offered family)")
    cal.add_argument("--gax-percentile", type=float, default=95.0)
    cal.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    cal.add_argument("--batch-size", type=int, default=64)
    cal.add_argument("--seed", type=int, default=0)
    cal.set_defaults(handler=run_calibrate)


def _evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="check a calibration's promise on separate labelled images",
        description="Exit 1 when the promise (of the new calibration, with --compare) is "
                    "broken beyond its binomial interval.")
    _model_args(ev)
    ev.add_argument("--data", required=True,
                    help="DIR/<class name>/*.png|jpg, or builtin:digits-test")
    ev.add_argument("--calibration", dest="calibration", required=True)
    ev.add_argument("--compare", type=Path, metavar="OLD",
                    help="also score calibration OLD on the same images and compare them "
                         "paired (risk AUROC, error recall, false-alarm rate)")
    ev.add_argument("--out", type=Path, help="also write the evaluation as JSON here")
    ev.add_argument("--bootstrap", type=int, default=1000)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.set_defaults(handler=run_evaluate)


def _report_parser(subparsers: argparse._SubParsersAction) -> None:
    rep = subparsers.add_parser("report", help="figures and an HTML page from a calibration")
    rep.add_argument("calibration", type=Path)
    rep.add_argument("--out", type=Path, required=True, help="output folder")
    rep.set_defaults(handler=run_report)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Return nested settings overrides for every flag given whose destination is a path
    of the settings model (the model decides, not a list here), then every --set."""
    nested: dict[str, Any] = {}
    paths = setting_paths()
    given = [(key, value) for key, value in vars(args).items()
             if value is not None and key in paths]
    for key, value in [*given, *getattr(args, "set_settings", [])]:
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _run(args: argparse.Namespace, body: Callable[[Any], int]) -> int:
    """Build settings, configure logs, run `body(settings)`; map known errors to exit 2."""
    from pydantic import ValidationError

    from .calibration.thresholds import GuaranteeUnavailable
    from .config import load_settings
    from .errors import AxguardError
    from .logs import configure_logging

    try:
        settings = load_settings(args.config, **overrides_from_args(args))
    except (ValidationError, FileNotFoundError) as err:
        print(f"axguard {args.command}: invalid settings: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        return body(settings)
    except AxguardError as err:
        print(f"axguard {args.command}: error: {err.message}", file=sys.stderr)
        return 2
    except GuaranteeUnavailable as err:
        print(f"axguard {args.command}: refused: {err}", file=sys.stderr)
        return 2


def run_serve(args: argparse.Namespace) -> int:
    from .transport.launch import launch

    return _run(args, launch)


def parse_pairs(value: str) -> list[tuple[str, str]]:
    """Return (method, process) pairs for calibrate's --pairs: default, all, or m:p,m:p."""
    from .calibration.calibrate import DEFAULT_PAIRS, all_pairs
    from .engine.attribution import require
    from .engine.scoring import require_process

    if value == "default":
        return list(DEFAULT_PAIRS)
    if value == "all":
        return all_pairs()
    pairs = []
    for token in _split_methods(value):
        method, _, process = token.partition(":")
        require(method)
        pairs.append((method, require_process(process or "sum", field="methods")))
    return pairs


def run_calibrate(args: argparse.Namespace) -> int:
    from .builder import build_bundle
    from .calibration.calibrate import CalibrateOptions, calibrate
    from .calibration.datasets import load_labelled_images
    from .engine.core import Engine
    from .flag.artifact import save_artifact

    def body(settings: Any) -> int:
        pairs = parse_pairs(args.pairs)
        bundle = build_bundle(settings.model, settings.attribution)
        engine = Engine(bundle, sorted({p[0] for p in pairs}, key=[q[0] for q in pairs].index))
        images = load_labelled_images(args.data, bundle.class_names)
        options = CalibrateOptions(
            pairs=pairs, families=args.families, epsilons=args.epsilons,
            views=settings.model.views, folds=args.folds, repeats=args.repeats,
            mode="error_recall" if args.recall is not None else "false_alarm",
            beta=args.beta, recall=args.recall or 0.9, delta=args.delta,
            max_cost=args.max_cost, seed=args.seed,
            gax_percentile=args.gax_percentile, n_bootstrap=args.bootstrap,
            batch_size=args.batch_size, progress=sys.stderr.isatty(),
        )
        artifact = calibrate(engine, images, options)
        artifact = save_artifact(artifact, args.out)
        t = artifact.threshold
        print(f"wrote {args.out} ({artifact.calibration_id}): {artifact.data.n_images} images, "
              f"{artifact.data.n_errors} wrong; threshold {t.value:.4f} ({t.mode} "
              f"{t.target}, delta {t.delta}); families kept "
              f"{[f.key for f in artifact.flag.families]} (verdict cost ≤ "
              f"{artifact.selection.cost:g} plain forwards)")
        for note in artifact.notes:
            print(f"  note: {note}")
        print("methods ranked by label-free AUROC: " + ", ".join(
            f"{r.method}/{r.ax_process} {r.auroc_label_free:.3f} (labelled "
            f"{r.auroc_labelled:.3f})" for r in artifact.ranking))
        return 0

    return _run(args, body)


def run_evaluate(args: argparse.Namespace) -> int:
    from .builder import build_engine
    from .calibration.datasets import load_labelled_images
    from .calibration.evaluate import compare, evaluate, format_comparison, format_evaluation

    def body(settings: Any) -> int:
        engine = build_engine(settings)
        images = load_labelled_images(args.data, engine.bundle.class_names)
        options = {"n_bootstrap": args.bootstrap, "batch_size": args.batch_size,
                   "progress": sys.stderr.isatty()}
        if args.compare is not None:
            old = build_engine(settings.model_copy(update={"calibration": str(args.compare)}))
            result = compare(engine, old, images, **options)
            print(format_comparison(result))
            held = result.new.promise_held
        else:
            result = evaluate(engine, images, **options)
            print(format_evaluation(result))
            held = result.promise_held
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(result.model_dump_json(indent=1) + "\n")
        return 0 if held else 1

    return _run(args, body)


def _finetune_parser(subparsers: argparse._SubParsersAction) -> None:
    ft = subparsers.add_parser(
        "finetune", help="the paper's fine-tuning recipe (Table 1) on ImageFolder data",
        description="Train a truncated torchvision network with a new linear layer (Adam lr "
                    "0.001, betas (0.5, 0.999), batches of 32 drawn at random) until the "
                    "validation accuracy reaches the target; write a model `serve --config` "
                    "takes.")
    ft.add_argument("--arch", choices=("resnet34", "resnet18", "alexnet"), default="resnet34",
                    help="resnet34: first 8 child modules; alexnet: first 6 feature modules; "
                         "resnet18: the ResNet recipe on a smaller network")
    ft.add_argument("--data", type=Path, required=True, help="training DIR/<class>/*.png|jpg")
    ft.add_argument("--val", type=Path, required=True, help="validation DIR/<class>/...")
    ft.add_argument("--out", type=Path, required=True,
                    help="folder for model.pt, classes.txt, model.yaml, finetune.json")
    ft.add_argument("--weights", type=Path,
                    help="pretrained state dict of the full torchvision network (a local "
                         "file; nothing is downloaded)")
    ft.add_argument("--input-size", type=int, default=256, help="square input (default 256)")
    ft.add_argument("--target-accuracy", type=float, default=0.9)
    ft.add_argument("--min-iterations", type=int, default=2400)
    ft.add_argument("--max-iterations", type=int, default=240_000)
    ft.add_argument("--eval-every", type=int, default=100,
                    help="iterations between validation passes (default 100)")
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--name", help="the served model's name (default ARCH-finetuned)")
    ft.set_defaults(handler=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from .errors import AxguardError
    from .paper.finetune import FinetuneOptions, finetune

    options = FinetuneOptions(
        arch=args.arch, data=args.data, val=args.val, out=args.out, weights=args.weights,
        input_size=args.input_size, target_accuracy=args.target_accuracy,
        min_iterations=args.min_iterations, max_iterations=args.max_iterations,
        eval_every=args.eval_every, batch_size=args.batch_size, seed=args.seed,
        name=args.name)
    try:
        result = finetune(options, progress=sys.stderr.isatty())
    except AxguardError as err:
        print(f"axguard finetune: error: {err.message}", file=sys.stderr)
        return 2
    print(f"{'reached' if result.reached_target else 'did not reach'} validation accuracy "
          f"{result.val_accuracy:.4f} (target {args.target_accuracy}) after "
          f"{result.iterations} iterations, {result.seconds:.0f} s; serve it with "
          f"`axguard serve --config {result.config_file}`")
    return 0


def _paper_figures_parser(subparsers: argparse._SubParsersAction) -> None:
    pf = subparsers.add_parser(
        "paper-figures", help="the paper's Figures 2-4, 7, 8 on a model and labelled images",
        description="CO of all six methods x SUM/PRODUCT (labelled and label-free), GAX CO "
                    "curves, Layer Grad-CAM per stage; one HTML page.")
    _model_args(pf)
    pf.add_argument("--data", required=True,
                    help="DIR/<class name>/*.png|jpg, or builtin:digits-test")
    pf.add_argument("--out", type=Path, required=True, help="output folder")
    pf.add_argument("--gax-images", type=int, default=5)
    pf.add_argument("--gax-steps", type=int, default=200)
    pf.add_argument("--gax-target", type=float,
                    help="GAX target CO (default: the 95th percentile of the correct "
                         "predictions' label-free saliency CO)")
    pf.add_argument("--batch-size", type=int, default=32)
    pf.set_defaults(handler=run_paper_figures)


def run_paper_figures(args: argparse.Namespace) -> int:
    from .builder import build_bundle
    from .calibration.datasets import load_labelled_images
    from .paper.figures import write_paper_figures

    def body(settings: Any) -> int:
        bundle = build_bundle(settings.model, settings.attribution)
        images = load_labelled_images(args.data, bundle.class_names)
        summary = write_paper_figures(
            bundle, images, args.out, gax_images=args.gax_images, gax_steps=args.gax_steps,
            gax_target=args.gax_target, batch_size=args.batch_size,
            progress=sys.stderr.isatty())
        print(f"wrote {args.out / 'index.html'}: {summary['images']} images, "
              f"{summary['errors']} wrong; largest labelled gap "
              f"{summary['largest_gap']['labelled']}, label-free "
              f"{summary['largest_gap']['label_free']}")
        return 0

    return _run(args, body)


def run_report(args: argparse.Namespace) -> int:
    from .calibration.report import write_report
    from .errors import AxguardError
    from .flag.artifact import load_artifact

    try:
        page = write_report(load_artifact(args.calibration), args.out)
    except AxguardError as err:
        print(f"axguard report: error: {err.message}", file=sys.stderr)
        return 2
    print(f"wrote {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `axguard` command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="axguard", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _serve_parser(subparsers)
    _calibrate_parser(subparsers)
    _evaluate_parser(subparsers)
    _report_parser(subparsers)
    _finetune_parser(subparsers)
    _paper_figures_parser(subparsers)
    add_client_commands(subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
