"""The `axguard` command: `serve` runs the server; check, info, health talk to one.

Subcommands only parse arguments, build settings and call library functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from axguard_client.cli import add_client_commands


def _serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model over gRPC",
        description="Serve a model. Flags override AXGUARD_* variables, which override "
                    "the YAML config file.",
    )
    serve.add_argument("--config", type=Path, help="YAML settings file")
    model = serve.add_argument_group("model")
    model.add_argument("--model", dest="model.source",
                       help="demo (default), torchvision:NAME, package.module:factory, "
                            "torchscript:PATH or a TorchScript file")
    model.add_argument("--weights", dest="model.weights", type=Path,
                       help="state dict file, loaded with weights_only=True")
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
    attr = serve.add_argument_group("attribution")
    attr.add_argument("--methods", dest="attribution.default_methods",
                      type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
                      help="comma-separated default methods (default saliency,deconvolution)")
    attr.add_argument("--grad-cam-layer", dest="attribution.grad_cam_layer")
    srv = serve.add_argument_group("server")
    srv.add_argument("--host", dest="server.host")
    srv.add_argument("--port", dest="server.port", type=int)
    srv.add_argument("--max-workers", dest="server.max_workers", type=int)
    srv.add_argument("--log-level", dest="log_level",
                     choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.set_defaults(handler=run_serve)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Return nested settings overrides for every dotted flag that was given."""
    nested: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None or key in ("handler", "command", "config"):
            continue
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .config import load_settings
    from .errors import AxguardError
    from .logs import configure_logging
    from .server import serve

    try:
        settings = load_settings(args.config, **overrides_from_args(args))
    except (ValidationError, FileNotFoundError) as err:
        print(f"axguard serve: invalid settings: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        return serve(settings)
    except AxguardError as err:
        print(f"axguard serve: error: {err.message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `axguard` command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="axguard", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _serve_parser(subparsers)
    add_client_commands(subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
