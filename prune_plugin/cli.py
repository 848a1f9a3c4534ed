"""``prune-plugin``: fine-prune | report | compress | decompress | schema.

The fine-pruning job needs the ``hf`` extra (transformers, datasets, PyYAML); it is imported
only when that command runs. Every other command works with the core alone (torch, pydantic,
safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prune_plugin.errors import PruningError, StateError


def parse_assignment(item: str, option: str = "--set") -> tuple[str, Any]:
    """``KEY=VALUE`` of a command-line option, the value read as JSON, else YAML."""
    import yaml

    if "=" not in item:
        raise SystemExit(f"{option} expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    try:  # JSON first: YAML 1.1 reads 1e-4 as a string
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, yaml.safe_load(value)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = dict(parse_assignment(item) for item in args.set or [])
    flags = {"model": args.model, "data.path": args.dataset, "output_dir": args.output_dir,
             "training.max_steps": args.max_steps,
             "data.max_train_samples": args.max_train_samples}
    out.update({k: v for k, v in flags.items() if v is not None})
    if args.max_steps is not None:
        out["training.epochs"] = None
    return out


def _fine_prune(args: argparse.Namespace) -> int:
    from prune_plugin.integrations.job import load_job, run_job

    job = load_job(args.job, overrides=_overrides(args))
    metrics = run_job(job, overwrite=args.overwrite, resume=args.resume,
                      progress=not args.no_progress)
    out = Path(job.output_dir)
    shown = {k: round(v, 4) for k, v in metrics["eval"].items()
             if k in ("accuracy", "exact_match", "f1", "pearson", "spearman", "loss")}
    print(f"\ndone: {metrics['method']}, {metrics['steps']} steps in "
          f"{metrics['train_wall_s']:.0f} s; eval {shown}; "
          f"{100 * metrics['remaining']:.2f}% of pruned weights remain")
    print(f"outputs in {out}/: model/ (plain model + tokenizer), metrics.json, sparsity.json, "
          "sparsity.png, config.resolved.yaml")
    return 0


def _report(args: argparse.Namespace) -> int:
    from prune_plugin.report import SparsityReport

    out = Path(args.run_dir)
    path = out / "sparsity.json"
    if not path.is_file():
        raise StateError(f"{out} holds no sparsity.json. Fix: pass the output folder of a "
                         "finished fine-prune run.")
    data = _read_json(path)
    try:
        report = SparsityReport.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{path} is not a sparsity report (missing {err}). Fix: run "
                         "'prune-plugin fine-prune' again for this run.") from None
    print(report)
    metrics = out / "metrics.json"
    if metrics.is_file():
        print("\nmetrics:", json.dumps(_read_json(metrics).get("eval")))
    plot = out / "sparsity.png"
    if not plot.is_file():  # the job writes it; drawn here only for runs that lack it
        try:
            from prune_plugin.integrations.plots import plot_sparsity

            plot_sparsity(data, plot, out.name)
        except ImportError:  # pragma: no cover - matplotlib missing
            print("(install matplotlib for the per-layer plot)")
            return 0
    print(f"plot: {plot}")
    return 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StateError(f"{path} is damaged ({err}): a run interrupted while writing it? Fix: "
                         "run the job again with --resume or --overwrite.") from None


def _compress(args: argparse.Namespace) -> int:
    from prune_plugin.compress import compress_folder, stored_bytes

    run = Path(args.run_dir)
    model_dir = run / "model" if (run / "model").is_dir() else run
    out = Path(args.output) if args.output else run / ("compressed-int8" if args.int8
                                                       else "compressed")
    manifest = compress_folder(model_dir, out, quantize="int8" if args.int8 else "none",
                               codec=args.codec)
    total, dense = stored_bytes(manifest)
    sparse, sparse_dense = stored_bytes(manifest, encoding="bitmask")
    n_sparse = sum(e["encoding"] == "bitmask" for e in manifest["params"].values())
    print(f"compressed {model_dir} -> {out}")
    print(f"  all weights: {dense / 1e6:.2f} MB dense fp32 -> {total / 1e6:.2f} MB")
    print(f"  {n_sparse} pruned matrices: {sparse_dense / 1e6:.2f} MB -> {sparse / 1e6:.2f} MB")
    return 0


def _decompress(args: argparse.Namespace) -> int:
    from prune_plugin.compress import decompress_folder

    print(f"wrote {decompress_folder(args.compressed_dir, args.output, overwrite=args.overwrite)}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from prune_plugin.policy import PruningPolicy

    if args.markdown:
        print(policy_reference(), end="")
    else:
        print(json.dumps(PruningPolicy.model_json_schema(), indent=2))
    return 0


def policy_reference() -> str:
    """docs/policies.md's reference: a table per method, from its model (fields, defaults,
    descriptions). A default that depends on the mode is shown in each mode."""
    from prune_plugin.policy import METHOD_POLICIES, PruningPolicy

    shared = PruningPolicy.model_fields
    out = ["### Every method", "", "| field | default | meaning |", "|---|---|---|"]
    example = METHOD_POLICIES["magnitude"](method="magnitude", total_steps=1000)
    out += [_row(name, info, {"": example}) for name, info in shared.items() if name != "method"]
    out.append("")
    for method, model in METHOD_POLICIES.items():
        modes: dict[str, dict[str, object]] = {"": {}}
        if "final_remaining" in model.model_fields \
                and not model.model_fields["final_remaining"].is_required() \
                and model.model_fields["final_remaining"].default is None:
            modes["with final_remaining"] = {"final_remaining": 0.1}
        if "remaining_control" in model.model_fields:
            modes["with remaining_control topv"] = {"final_remaining": 0.1,
                                                    "remaining_control": "topv"}
        built = {mode: model(method=method, total_steps=1000, **extra)
                 for mode, extra in modes.items()}
        given = {name for extra in modes.values() for name in extra}
        out += [f"### `{method}`: {model.__name__}", "", (model.__doc__ or "").split("\n\n")[0]
                .replace("\n    ", " ").strip(), "", "| field | default | meaning |",
                "|---|---|---|"]
        out += [_row(name, info, {"": built[""]} if name in given else built)
                for name, info in model.model_fields.items() if name not in shared]
        out.append("")
    return "\n".join(out)


def _row(name: str, info: Any, built: dict[str, Any]) -> str:
    if info.is_required():
        default = "required"
    else:
        values = {mode: getattr(p, name) for mode, p in built.items()}
        default = _shown(values[""]) + "".join(f"; {mode}: {_shown(v)}"
                                               for mode, v in values.items()
                                               if mode and v != values[""])
    return f"| `{name}` | {default} | {(info.description or '').replace('|', chr(92) + '|')} |"


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list) and value and hasattr(value[0], "model_dump"):
        return "`[...]`"
    return f"`{json.dumps(value)}`".replace("|", "\\|")


def build_parser() -> argparse.ArgumentParser:
    from prune_plugin import __version__

    parser = argparse.ArgumentParser(prog="prune-plugin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prune-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fp = sub.add_parser("fine-prune", help="run a fine-pruning job from a YAML file")
    fp.add_argument("job", help="job YAML")
    fp.add_argument("--model", help="override the model (Hub id, folder, or 'minilm')")
    fp.add_argument("--dataset", help="override data.path (Hub id or local folder)")
    fp.add_argument("--output-dir", help="override output_dir")
    fp.add_argument("--max-steps", type=int, help="override training.max_steps")
    fp.add_argument("--max-train-samples", type=int, help="override data.max_train_samples")
    fp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override any field by dotted key, e.g. --set pruning.method=l0")
    fp.add_argument("--overwrite", action="store_true", help="replace a finished run")
    fp.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    fp.add_argument("--no-progress", action="store_true", help="no progress bars")
    fp.set_defaults(func=_fine_prune)
    rp = sub.add_parser("report", help="sparsity table and plot of a finished run")
    rp.add_argument("run_dir")
    rp.set_defaults(func=_report)
    cp = sub.add_parser("compress", help="compressed sparse checkpoint of a finished run")
    cp.add_argument("run_dir", help="a run's output folder, or a saved model folder")
    cp.add_argument("--int8", action="store_true", help="int8 per-row quantised values")
    cp.add_argument("--codec", default="lzma", choices=["lzma", "zstd", "none"],
                    help="lzma (default, Python's own), zstd (needs the zstandard package)")
    cp.add_argument("--output", help="default: RUN_DIR/compressed[-int8]")
    cp.set_defaults(func=_compress)
    dp = sub.add_parser("decompress", help="rebuild a from_pretrained-loadable folder")
    dp.add_argument("compressed_dir")
    dp.add_argument("output", help="a new or empty folder")
    dp.add_argument("--overwrite", action="store_true",
                    help="replace the files of a folder that is not empty")
    dp.set_defaults(func=_decompress)
    sp = sub.add_parser("schema", help="print the policy's JSON schema")
    sp.add_argument("--markdown", action="store_true",
                    help="the reference tables of docs/policies.md instead")
    sp.set_defaults(func=_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except PruningError as err:  # the job's errors included
        code = getattr(err, "exit_code", None)
        if code is not None:  # a signal stopped the job at a safe point: not an error
            print(f"\n{err}", file=sys.stderr)
            return code
        # One clear line (or block) for the user's mistakes; real bugs keep their traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
