"""The ``barlow`` command: each subcommand is one library call."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from barlow import __version__


def _pretrain(args: argparse.Namespace) -> int:
    from barlow.config import apply_overrides, from_dict, read_recipe
    from barlow.training import pretrain

    overrides = list(args.set)
    if args.data is not None:
        overrides.insert(0, f"data.dataset={_quoted(args.data)}")
    if args.data_root is not None:
        overrides.insert(0, f"data.root={_quoted(args.data_root)}")
    if args.method is not None:
        overrides.insert(0, f"method.name={_quoted(args.method)}")
    if args.epochs is not None:
        overrides.insert(0, f"train.epochs={args.epochs}")
    if args.skip_corrupt:
        overrides.insert(0, "data.skip_corrupt=true")
    if args.resume_weights_only:
        overrides.insert(0, "train.resume_weights_only=true")
    raw = read_recipe(args.recipe)
    if args.method is not None and raw.get("method", {}).get("name") not in (None, args.method):
        raw["method"] = {}  # another method's hyper-parameters do not carry over
    cfg = from_dict(apply_overrides(raw, overrides))
    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    pretrain(
        cfg,
        out,
        resume=args.resume or args.resume_weights_only,
        overwrite=args.overwrite,
        argv=sys.argv,
        progress=not args.quiet,
    )
    _say_once(f"run written to {out}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from barlow.training.finetune import finetune

    overrides = list(args.set)
    if args.labels is not None:
        overrides.insert(0, f"finetune.labels={_quoted(args.labels)}")
    if args.epochs is not None:
        overrides.insert(0, f"train.epochs={args.epochs}")
    out = Path(args.out) if args.out else _finetune_out(args.checkpoint, args.labels, args.data)
    finetune(
        args.checkpoint,
        out,
        recipe=args.recipe,
        overrides=overrides,
        dataset=args.data,
        root=args.data_root,
        resume=args.resume,
        argv=sys.argv,
        progress=not args.quiet,
    )
    _say_once(f"fine-tuning written to {out}")
    return 0


def _finetune_out(checkpoint: str, labels: str | None, dataset: str | None) -> Path:
    """Default --out: ``finetune-<labels>[-<dataset>]`` beside the checkpoint."""
    name = "finetune-" + re.sub(r"[^A-Za-z0-9.]+", "", (labels or "recipe").replace("%", "pct"))
    if dataset:
        name += "-" + re.sub(r"[^A-Za-z0-9.-]+", "_", Path(dataset).name)
    return Path(checkpoint).parent / name


def _say_once(line: str) -> None:
    """Print ``line`` on the main process only (under torchrun every rank runs the command)."""
    from barlow import distributed

    if distributed.is_main_process():
        print(line)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _evaluate(args: argparse.Namespace) -> int:
    from barlow.assessment import run_knn, run_linear

    if args.command == "knn":
        run_knn(args.checkpoint, dataset=args.data, root=args.data_root, overrides=args.set)
    else:
        run_linear(
            args.checkpoint,
            dataset=args.data,
            root=args.data_root,
            protocol=args.protocol,
            overrides=args.set,
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from barlow.export import ExportVerificationError, export_checkpoint

    try:
        done = export_checkpoint(args.checkpoint, args.format, args.out, overwrite=args.overwrite)
    except ExportVerificationError as exc:  # the export is wrong, not the input: nothing written
        print(f"barlow export: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.format} export written to {done.path}, model card {done.card}")
    if done.check:
        print(done.check)
    return 0


def _embed(args: argparse.Namespace) -> int:
    from barlow.embed import embed

    done = embed(
        args.checkpoint,
        args.out,
        dataset=args.data,
        root=args.data_root,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        neighbours=args.neighbours,
        overwrite=args.overwrite,
        progress=not args.quiet,
        overrides=args.set,
    )
    files = done.files
    print(
        f"{done.count} embeddings of {done.dim} features written to {files.embeddings}, "
        f"images listed in {files.table} ({done.seconds:.1f} s)"
    )
    if done.neighbours:
        print(f"{done.neighbours} nearest neighbours in {files.neighbours}, {files.neighbour_sims}")
    for split, agreement in done.agreement.items():
        print(f"neighbours sharing the image's label ({split}): {100 * agreement:.2f} %")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from barlow.methods import METHODS, method_parameters

    for name, cls in METHODS.items():
        defaults = ", ".join(f"{k}={p.default!r}" for k, p in method_parameters(name).items())
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {doc}\n  views {cls.views!r} ×{cls.num_views}; {defaults}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from barlow.config import shipped_recipes

    for name, path in sorted(shipped_recipes().items()):
        # The recipe's leading comment, up to its first full stop.
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").strip())
        summary = re.split(r"\.\s+(?=[A-Z][a-z]*\s)", " ".join(comment))[0].rstrip(".")
        if len(summary) > 100:
            summary = summary[:99] + "…"
        print(f"{name:24} {summary}")
    return 0


def _add_pretrain(sub: Any) -> None:
    """The ``pretrain`` subcommand."""
    p = sub.add_parser("pretrain", help="pretrain an encoder from a recipe")
    p.add_argument(
        "recipe",
        nargs="?",
        default="digits",
        help="shipped recipe name or TOML file (default: digits)",
    )
    p.add_argument(
        "--data", help="dataset name (digits, fashion-mnist, cifar10, …) or image folder"
    )
    p.add_argument("--data-root", help="directory holding the dataset's files")
    p.add_argument("--method", help="method name (see `barlow methods`)")
    p.add_argument("--epochs", type=int, help="shorthand for --set train.epochs=N")
    p.add_argument("--out", help="run directory (default: runs/<recipe>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. optim.lr=0.3",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--resume-weights-only",
        action="store_true",
        help="--resume, and if the checkpoint's run differs (method, model, batch, dataset) "
        "start a fresh schedule from its weights instead of failing",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="drop images that cannot be decoded (counted and reported) instead of stopping",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_pretrain)


def _add_finetune(sub: Any) -> None:
    """The ``finetune`` subcommand."""
    f = sub.add_parser(
        "finetune",
        help="fine-tune an encoder on few labels, beside from-scratch and probe baselines",
    )
    f.add_argument("checkpoint", help="checkpoint.pt written by `barlow pretrain`")
    f.add_argument(
        "--labels",
        help="labelled subset: 1%%, 10%%, N (images in all, class-stratified) or an index file",
    )
    f.add_argument("--recipe", default="paper", help="fine-tuning recipe (default: paper)")
    f.add_argument("--data", help="fine-tune on another labelled dataset (transfer)")
    f.add_argument("--data-root", help="directory holding that dataset's files")
    f.add_argument("--epochs", type=int, help="shorthand for --set train.epochs=N")
    f.add_argument("--out", help="output directory (default: finetune-<labels> beside CKPT)")
    f.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. finetune.head_lr=1"
    )
    f.add_argument("--resume", action="store_true", help="continue the fine-tuning in --out")
    f.add_argument("--quiet", action="store_true", help="no progress lines")
    f.set_defaults(func=_finetune)


def _add_evaluations(sub: Any) -> None:
    """The ``knn`` and ``linear`` subcommands."""
    for name, text in (("knn", "weighted kNN accuracy"), ("linear", "linear-probe accuracy")):
        e = sub.add_parser(name, help=f"{text} of a pretrained checkpoint")
        e.add_argument("checkpoint", help="checkpoint.pt written by `barlow pretrain`")
        e.add_argument("--data", help="evaluate on another labelled dataset than the run's")
        e.add_argument("--data-root", help="directory holding the dataset's files")
        e.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. eval.knn_k=20"
        )
        if name == "linear":
            e.add_argument(
                "--protocol",
                choices=("probe", "paper"),
                default="probe",
                help="probe: fast, frozen features; paper: linear head trained with augmentation",
            )
        e.set_defaults(func=_evaluate)


def _add_export(sub: Any) -> None:
    """The ``export`` subcommand."""
    x = sub.add_parser("export", help="export a pretrained encoder for other programs")
    x.add_argument("checkpoint", help="checkpoint.pt written by `barlow pretrain`")
    x.add_argument(
        "--format",
        required=True,
        help="torchvision (state dict for torchvision.models.resnet*), safetensors, onnx "
        "(needs barlow[export]) or torchscript",
    )
    x.add_argument("--out", help="folder for the file and MODEL.md (default: export/ beside it)")
    x.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    x.set_defaults(func=_export)


def _add_embed(sub: Any) -> None:
    """The ``embed`` subcommand."""
    b = sub.add_parser("embed", help="write the encoder's features of every image of a dataset")
    b.add_argument("checkpoint", help="checkpoint.pt written by `barlow pretrain`")
    b.add_argument("--out", required=True, help="features file, e.g. emb.npy (emb.csv beside it)")
    b.add_argument("--data", help="dataset name or image folder (default: the run's dataset)")
    b.add_argument("--data-root", help="directory holding the dataset's files")
    b.add_argument(
        "--split",
        choices=("train", "test", "all"),
        default="all",
        help="which split's images (default: all, the train split then the test split)",
    )
    b.add_argument(
        "--neighbours",
        type=int,
        default=0,
        metavar="K",
        help="also write each image's K nearest neighbours (cosine, itself excluded)",
    )
    b.add_argument("--batch-size", type=int, help="images per batch (default: eval.batch_size)")
    b.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    b.add_argument("--overwrite", action="store_true", help="replace existing output files")
    b.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. data.num_workers=4"
    )
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=_embed)


def _report(args: argparse.Namespace) -> int:
    from barlow.report.page import build_report

    done = build_report(
        args.runs,
        args.out,
        embedding_map=not args.no_embedding_map,
        view_images=args.images,
        progress=not args.quiet,
    )
    print(
        f"report of {done.runs} run(s) written to {done.path} "
        f"({done.size_bytes / 2**20:.1f} MiB, {done.seconds:.0f} s)"
    )
    return 0


def _views(args: argparse.Namespace) -> int:
    from barlow.report.views import write_views

    grid = write_views(
        args.recipe, args.out, images=args.images, seed=args.seed, overrides=args.set
    )
    print(
        f"{grid.rows} images of {grid.dataset} and {grid.views} views each (recipe "
        f"{grid.recipe!r}) written to {args.out}"
    )
    return 0


def _add_report(sub: Any) -> None:
    """The ``report`` and ``views`` subcommands."""
    p = sub.add_parser("report", help="one self-contained HTML page about one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories or study directories")
    p.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    p.add_argument(
        "--no-embedding-map",
        action="store_true",
        help="skip the 2-D map and nearest neighbours of the test representations (the slow part)",
    )
    p.add_argument("--images", type=int, default=6, help="images in the training-views grid")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_report)
    v = sub.add_parser("views", help="a grid of the training views a recipe draws, as a PNG")
    v.add_argument("recipe", help="shipped recipe name or TOML file, as `barlow pretrain` takes")
    v.add_argument("--out", required=True, help="the PNG file to write")
    v.add_argument("--images", type=int, default=8, help="rows: images of the training set")
    v.add_argument("--seed", type=int, default=0, help="which images and which views")
    v.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. data.views=simclr"
    )
    v.set_defaults(func=_views)


def _study(args: argparse.Namespace) -> int:
    """``barlow sweep`` and ``barlow study``: a grid of runs; non-zero when a point failed."""
    from barlow.study import (
        load_study,
        parse_grid,
        parse_seeds,
        run_study,
        shipped_studies,
        sweep_study,
    )

    if args.command == "study" and args.name is None:
        for name in sorted(shipped_studies()):
            print(name)
        return 0
    if args.command == "study":
        study = load_study(args.name, args.scale, epochs=args.epochs, overrides=args.set)
    else:
        axes = [parse_grid(option) for option in args.grid]
        seeds = parse_seeds(args.seeds)
        study = sweep_study(args.recipe, axes, seeds=seeds, epochs=args.epochs, overrides=args.set)
    if args.list:
        for point in study.points():
            print(f"{point.index:4d}  {point.name}")
        return 0
    if args.out is None:
        raise ValueError(f"barlow {args.command} needs --out DIR, the study directory")
    outcome = run_study(study, Path(args.out), point=args.point, progress=not args.quiet)
    done = f"{len(outcome.ran)} trained, {len(outcome.skipped)} finished before"
    print(f"study written to {args.out} ({done}); results in {Path(args.out) / 'results.md'}")
    for name, error in outcome.failed.items():
        print(f"barlow {args.command}: point {name} failed: {error}", file=sys.stderr)
    return 1 if outcome.failed else 0


def _add_studies(sub: Any) -> None:
    """The ``sweep`` and ``study`` subcommands."""
    s = sub.add_parser("sweep", help="pretrain a recipe over a grid of settings and seeds")
    s.add_argument("recipe", help="shipped recipe name or TOML file")
    s.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid axis, e.g. method.lambd=0.002,0.005 (repeat for a Cartesian product; "
        "recipe=NAME1,NAME2 varies the recipe)",
    )
    s.add_argument("--seeds", default="0", help="seeds of every grid point (default: 0)")
    t = sub.add_parser("study", help="run a shipped study (an ablation of the paper)")
    t.add_argument("name", nargs="?", help="shipped study name or study TOML; none: list them")
    t.add_argument("--scale", choices=("cpu", "gpu"), default="cpu", help="default: cpu")
    for p in (s, t):
        p.add_argument("--out", help="study directory: a run directory per point, results.*")
        p.add_argument("--epochs", type=int, help="shorthand for --set train.epochs=N")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="for every point"
        )
        p.add_argument(
            "--point",
            type=int,
            metavar="K",
            help="run only point K (0-based; default: $SLURM_ARRAY_TASK_ID when set)",
        )
        p.add_argument("--list", action="store_true", help="list the points and stop")
        p.add_argument("--quiet", action="store_true", help="no lines from the runs")
        p.set_defaults(func=_study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="barlow",
        description="Self-supervised visual representation learning by redundancy reduction.",
    )
    parser.add_argument("--version", action="version", version=f"barlow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for add in (_add_pretrain, _add_finetune, _add_evaluations, _add_export, _add_embed):
        add(sub)
    _add_report(sub)
    _add_studies(sub)
    m = sub.add_parser("methods", help="list the methods and their default hyper-parameters")
    m.set_defaults(func=_methods)
    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch  # already loaded by barlow.training below

    # Denormal floats cost x86 CPUs slow microcode (compute.flush_denormals). The flag is per
    # thread and the intra-op pool's threads copy it when they are created, so it is set here,
    # before any tensor work: then every thread of this process flushes them.
    torch.set_flush_denormal(True)

    from barlow import cpu_share
    from barlow.checkpoint import CheckpointWriteError
    from barlow.health import CollapseError
    from barlow.preemption import Preempted
    from barlow.training import NonFiniteLossError

    try:
        with cpu_share.shared_cpu(cpu_share.AUTO):  # a run's train.threads applies inside
            result: Any = args.func(args)
        return int(result)
    except Preempted as exc:
        print(f"barlow {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"barlow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CollapseError, CheckpointWriteError) as exc:  # the run failed;
        # its last checkpoint stays as it was
        print(f"barlow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as exc:  # its message says what to shrink
        print(f"barlow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"barlow {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        from barlow import distributed

        distributed.leave()
