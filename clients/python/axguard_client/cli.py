"""Client subcommands of the `axguard` CLI: check, feedback, diagnose, info, health. No
torch is imported."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from .client import AxguardClient, ax_process_name, method_name
from .errors import ClientError

DEFAULT_TARGET = "localhost:50051"


def connect(args: argparse.Namespace) -> AxguardClient:
    """Return a client for the target, TLS and token options of a client subcommand."""
    token = None
    if args.token_file is not None:
        lines = args.token_file.read_text().splitlines()
        token = lines[0].strip() if lines else ""
    return AxguardClient(args.target, timeout=args.timeout, tls_ca=args.tls_ca,
                         tls_cert=args.tls_cert, tls_key=args.tls_key,
                         tls_server_name=args.tls_server_name, token=token)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register check, info and health on an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=DEFAULT_TARGET,
                        help=f"server address host:port (default {DEFAULT_TARGET})")
    common.add_argument("--timeout", type=float, default=30.0,
                        help="deadline of each call in seconds (default 30)")
    common.add_argument("--json", action="store_true", help="print the response as JSON")
    tls = common.add_argument_group("TLS and tokens")
    tls.add_argument("--tls-ca", type=Path, help="CA bundle that signed the server's "
                                                 "certificate (turns TLS on)")
    tls.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    tls.add_argument("--tls-key", type=Path, help="client private key (mutual TLS)")
    tls.add_argument("--tls-server-name", help="name to check in the server's certificate")
    tls.add_argument("--token-file", type=Path,
                     help="file whose first line is the bearer token to send")

    check = subparsers.add_parser("check", parents=[common],
                                  help="check images on a running server")
    check.add_argument("images", nargs="+", type=Path, help="PNG/JPEG/BMP/TIFF files")
    check.add_argument("--methods", type=_split, default=[],
                       help="comma-separated methods, e.g. saliency,deconvolution "
                            "(default: the server's)")
    check.add_argument("--ax", type=_split, default=[], dest="ax_processes",
                       help="comma-separated AX processes: sum,product (default sum)")
    check.add_argument("--verdict-only", action="store_true",
                       help="only the prediction and the verdict (no CO scores)")
    check.add_argument("--label", type=int, default=None,
                       help="true class index: adds the paper's labelled CO score")
    check.set_defaults(handler=run_check)

    diagnose = subparsers.add_parser("diagnose", parents=[common],
                                     help="run a GAX diagnosis and write the viewer")
    diagnose.add_argument("image", type=Path)
    diagnose.add_argument("--html", type=Path, help="write the viewer page here")
    diagnose.add_argument("--png", type=Path, help="write the final step as a PNG figure")
    diagnose.add_argument("--target-class", type=int, default=None)
    diagnose.add_argument("--target-co", type=float, default=None)
    diagnose.add_argument("--max-steps", type=int, default=500)
    diagnose.add_argument("--learning-rate", type=float, default=None)
    diagnose.add_argument("--similarity-weight", type=float, default=None)
    diagnose.add_argument("--snapshot-every", type=int, default=10,
                          help="stream a heatmap every N steps for the slider (default 10)")
    diagnose.set_defaults(handler=run_diagnose, timeout=600.0)

    feedback = subparsers.add_parser(
        "feedback", parents=[common], help="send true labels for earlier checks",
        description="Send true labels from a CSV file with the columns receipt,label (a "
                    "header row is optional), in requests of --batch rows. Exit 1 when any "
                    "row is refused; each refused row is printed with its line number.")
    feedback.add_argument("csv", type=Path, help="CSV file: receipt,label per row ('-' = stdin)")
    feedback.add_argument("--batch", type=int, default=1000,
                          help="rows per Feedback request (default 1000)")
    feedback.set_defaults(handler=run_feedback)

    info = subparsers.add_parser("info", parents=[common], help="describe the served model")
    info.set_defaults(handler=run_info)

    health = subparsers.add_parser("health", parents=[common], help="health status")
    health.add_argument("--service", default="", help="service name (default: overall)")
    health.set_defaults(handler=run_health)


def _to_dict(message: object) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True,  # type: ignore[arg-type]
                         always_print_fields_with_no_presence=True)


def format_check(path: Path, response: object) -> str:
    """Return the human-readable lines for one CheckResponse."""
    p = response.prediction  # type: ignore[attr-defined]
    lines = [f"{path}: predicted {p.class_name!r} (class {p.class_index}) "
             f"with probability {p.probability:.4f}"]
    for s in response.co_scores:  # type: ignore[attr-defined]
        label = f"  CO {method_name(s.method)}/{ax_process_name(s.ax_process)}"
        text = f"{label:<34} {s.score:+.4f}"
        if s.HasField("labelled_score"):
            text += f"   labelled {s.labelled_score:+.4f}"
        if s.zero_heatmap:
            text += "   (zero heatmap)"
        lines.append(text)
    v = response.verdict  # type: ignore[attr-defined]
    if v.calibrated:
        word = "LIKELY WRONG" if v.likely_wrong else "ok"
        lines.append(f"  verdict: {word} (risk {v.risk:.4f}, threshold {v.threshold:.4f}, "
                     f"calibration {v.calibration_id})")
        for name, value in sorted(v.features.items()):
            lines.append(f"    evidence {name:<40} {value:+.4f}")
    else:
        lines.append("  verdict: not calibrated (the server has no calibration loaded)")
    if response.receipt:  # type: ignore[attr-defined]
        lines.append(f"  receipt: {response.receipt}")  # type: ignore[attr-defined]
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    with connect(args) as client:
        failed = 0
        outputs = []
        for path in args.images:
            try:
                response = client.check(path, methods=args.methods,
                                        ax_processes=args.ax_processes, label=args.label,
                                        verdict_only=args.verdict_only)
            except (ClientError, OSError) as err:
                print(f"{path}: error: {err}", file=sys.stderr)
                failed += 1
                continue
            if args.json:
                outputs.append({"image": str(path), **_to_dict(response)})
            else:
                print(format_check(path, response))
        if args.json:
            print(json.dumps(outputs[0] if len(args.images) == 1 and outputs else outputs,
                             indent=2))
    return 1 if failed else 0


def read_labels(lines: object) -> list[tuple[int, str, int]]:
    """Return (line number, receipt, label) rows of a receipt,label CSV; ValueError names the
    first bad line. A first row whose label is not a number is taken as a header."""
    rows = []
    for number, row in enumerate(csv.reader(lines), start=1):  # type: ignore[arg-type]
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise ValueError(f"line {number}: expected 2 columns (receipt,label), got {len(row)}")
        receipt, label = row[0].strip(), row[1].strip()
        try:
            rows.append((number, receipt, int(label)))
        except ValueError:
            if number == 1:  # header
                continue
            raise ValueError(f"line {number}: label {label!r} is not a class index") from None
    return rows


def run_feedback(args: argparse.Namespace) -> int:
    if args.batch < 1:
        print("error: --batch must be at least 1", file=sys.stderr)
        return 2
    try:
        if str(args.csv) == "-":
            rows = read_labels(sys.stdin)
        else:
            with args.csv.open(newline="") as f:
                rows = read_labels(f)
    except (OSError, ValueError) as err:
        print(f"{args.csv}: error: {err}", file=sys.stderr)
        return 2
    totals = {"rows": len(rows), "counted": 0, "duplicates": 0, "errors": 0}
    refused = []
    with connect(args) as client:
        for start in range(0, len(rows), args.batch):
            chunk = rows[start:start + args.batch]
            try:
                response = client.feedback([(r, lbl) for _, r, lbl in chunk])
            except ClientError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            totals["counted"] += response.counted
            totals["duplicates"] += response.duplicates
            totals["errors"] += response.errors
            for (number, _, _), result in zip(chunk, response.results, strict=True):
                if result.HasField("error"):
                    # The server numbers items within its request; show the file's line.
                    message = result.error.message.split(": ", 1)[-1]
                    field = result.error.message.split(": ", 1)[0].rsplit(".", 1)[-1]
                    refused.append({"line": number, "field": field, "message": message})
    if args.json:
        print(json.dumps({**totals, "refused": refused}, indent=2))
    else:
        for r in refused:
            print(f"{args.csv}:{r['line']}: {r['field']}: {r['message']}", file=sys.stderr)
        print(f"{totals['rows']} rows: {totals['counted']} counted, {totals['duplicates']} "
              f"already counted, {totals['errors']} refused")
    return 1 if refused else 0


def run_diagnose(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .viewer import Diagnosis, render_html, write_png

    diagnosis = Diagnosis()
    with connect(args) as client, tqdm(
            total=args.max_steps, unit="step", desc="GAX", disable=args.json) as bar:
        try:
            for event in client.diagnose(
                    args.image, target_class=args.target_class, target_co=args.target_co,
                    max_steps=args.max_steps, learning_rate=args.learning_rate,
                    similarity_weight=args.similarity_weight,
                    snapshot_every=args.snapshot_every):
                diagnosis.add(event)
                if event.WhichOneof("event") == "progress":
                    bar.update(1)
                    bar.set_postfix(co=f"{event.progress.co_score:.2f}")
        except (ClientError, OSError) as err:
            print(f"{args.image}: error: {err}", file=sys.stderr)
            return 1
    r = diagnosis.result
    if r is None:
        print(f"{args.image}: error: the diagnosis ended without a result", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"image": str(args.image), "reached_target": r.reached_target,
                          "steps": r.steps, "final_co": r.final_co, "target_co": r.target_co,
                          "seconds": r.seconds, "target_class": r.target_class,
                          "before": _to_dict(r.prediction_before),
                          "after": _to_dict(r.prediction_after)}, indent=2))
    else:
        print(f"{args.image}: class {r.target_class}: "
              f"{'reached' if r.reached_target else 'did not reach'} target CO "
              f"{r.target_co:.2f} in {r.steps} steps ({r.seconds:.2f} s); final CO "
              f"{r.final_co:.2f}; prediction {r.prediction_before.class_name} "
              f"(p={r.prediction_before.probability:.3f}) -> {r.prediction_after.class_name} "
              f"(p={r.prediction_after.probability:.3f}) with the heatmap added")
    if args.html:
        args.html.write_text(render_html(diagnosis, f"GAX diagnosis of {args.image.name}"))
        print(f"wrote {args.html}")
    if args.png:
        write_png(diagnosis, args.png)
        print(f"wrote {args.png}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            info = client.model_info()
        except ClientError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(_to_dict(info), indent=2))
        return 0
    print(f"model {info.name} version {info.version}")
    print(f"  fingerprint  {info.fingerprint}")
    mean = [round(v, 4) for v in info.mean]
    std = [round(v, 4) for v in info.std]
    print(f"  input        {list(info.input_shape)} mean {mean} std {std}")
    print(f"  classes      {', '.join(info.class_names)}")
    print(f"  methods      {', '.join(method_name(m) for m in info.available_methods)}")
    print(f"  defaults     {', '.join(method_name(m) for m in info.default_methods)}")
    print(f"  device       {info.device}{'  (TorchScript)' if info.torchscript else ''}")
    calibration = info.calibration.calibration_id if info.HasField("calibration") else "none"
    print(f"  calibration  {calibration}")
    fb = info.feedback
    print("  feedback     " + (f"on (signing key {fb.signing_key_id}, receipts valid "
                                f"{fb.max_age_seconds / 86400:g} days)" if fb.enabled
                               else "off (no receipt key)"))
    return 0


def run_health(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            status = client.health(args.service)
        except ClientError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(json.dumps({"status": status}) if args.json else status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    """The client-only CLI (`python -m axguard_client.cli check ...`)."""
    parser = argparse.ArgumentParser(prog="axguard-client")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
