"""``barlow export``: a pretrained encoder in the formats other programs load, with a model card.

Formats (one file each, named after the backbone, e.g. ``resnet50.pth``):

    torchvision   torch.save of a plain state dict with torchvision's ResNet keys:
                  torchvision.models.resnet50().load_state_dict(sd, strict=False) misses only fc
    safetensors   the backbone's weights (torchvision keys for a ResNet) and what they expect
    onnx          the backbone in eval mode, dynamic batch axis, checked against PyTorch by
                  onnxruntime before it is written
    torchscript   torch.jit.trace of the backbone in eval mode, checked after reloading

Every export writes ``MODEL.md`` beside the file: architecture, input, method, data, recipe,
epochs, accuracy where the run measured it, the commands, and how to load each file. An export
folder may hold several formats of the same weights; the card lists them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import re
import shlex
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from barlow import __version__, checkpoint, data
from barlow.backbones import ResNetTrunk
from barlow.config import Config, from_dict
from barlow.encoder import build_method, crop_size, weightless_settings
from barlow.rundir import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    OutDirError,
    atomic_write,
    atomic_write_text,
    make_run_directory,
)

FORMATS: tuple[str, ...] = ("torchvision", "safetensors", "onnx", "torchscript")
CARD_NAME = "MODEL.md"
TOLERANCE = 1e-4  # max |exported − PyTorch| on a random batch, float32 features
_SUFFIXES = {
    "torchvision": ".pth",
    "safetensors": ".safetensors",
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
}
_MARKER = re.compile(r"<!-- barlow export (\{.*\}) -->")
_CHECK_BATCH = 3  # not the batch the exporters trace with (2), so the dynamic axis is exercised


class ExportVerificationError(RuntimeError):
    """The exported model does not compute what the PyTorch backbone computes."""


@dataclass(frozen=True)
class Encoder:
    """A checkpoint's backbone and the facts a card states about it."""

    backbone: nn.Module
    cfg: Config
    state: dict[str, Any]  # the training checkpoint, as loaded
    source: Path
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def name(self) -> str:
        return self.cfg.model.backbone

    def example(self, batch: int, seed: int = 0) -> Tensor:
        """A normalised-looking random batch (B, C, S, S) of the encoder's input."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.channels, self.size, self.size, generator=generator)


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the weights file, the card, and the check it passed (or "")."""

    path: Path
    card: Path
    check: str


def load_encoder(path: str | Path) -> Encoder:
    """The backbone of a ``barlow pretrain`` checkpoint, on the CPU in eval mode.

    The dataset itself is not needed: an image folder that is gone is built with the facts every
    folder shares (3 channels, ImageNet statistics).
    """
    path = Path(path)
    state = checkpoint.load_checkpoint(path)
    for key in ("config", "method"):
        if key not in state:
            raise ValueError(
                f"{path} is not a barlow pretraining checkpoint (no {key!r} entry); export the "
                f"{CHECKPOINT_NAME} a `barlow pretrain` run wrote"
            )
    cfg = from_dict(state["config"])
    facts = data.DATASETS.get(cfg.data.dataset, data.DATASETS["folder"])
    built = cfg
    if cfg.data.dataset not in data.DATASETS:
        built = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="folder"))
    method = build_method(built)
    checkpoint.load_method_weights(method, state["method"], source=str(path))
    backbone = method.backbone.float().eval()
    return Encoder(
        backbone, cfg, state, path, facts.channels, crop_size(cfg), facts.mean, facts.std
    )


def torchvision_state_dict(encoder: Encoder) -> dict[str, Tensor]:
    """The backbone's weights under torchvision's ResNet keys (barlow's carry a ``net.``
    prefix). Refuses, naming why and the way out, weights whose shapes torchvision's stock
    ResNet does not have."""
    backbone, name = encoder.backbone, encoder.name
    others = "export --format safetensors, onnx or torchscript instead"
    if not isinstance(backbone, ResNetTrunk):
        raise ValueError(
            f"{encoder.source} holds a {name} encoder, not a torchvision model, so it has no "
            f"torchvision format; {others}"
        )
    conv1, net = backbone.net.conv1, backbone.net
    if conv1.kernel_size != (7, 7) or not isinstance(net.maxpool, nn.MaxPool2d):
        retrain = ", or pretrain with --set model.small_images=false" * (conv1.in_channels == 3)
        raise ValueError(
            f"{encoder.source}'s {name} has the 3×3 stem without max-pool that barlow uses for "
            f"images ≤ 64 px (model.small_images), so its weights do not fit torchvision's "
            f"{name} (7×7 conv1 and max-pool); {others}{retrain}"
        )
    if conv1.in_channels != 3:
        raise ValueError(
            f"{encoder.source}'s {name} takes {conv1.in_channels}-channel images (dataset "
            f"{encoder.cfg.data.dataset}), torchvision's {name} takes 3, so the weights do not "
            f"fit its conv1; {others}"
        )
    return {key.removeprefix("net."): value for key, value in backbone.state_dict().items()}


def backbone_state_dict(encoder: Encoder) -> dict[str, Tensor]:
    """The backbone's weights; torchvision's key names for a ResNet, whatever its stem."""
    weights = encoder.backbone.state_dict()
    if isinstance(encoder.backbone, ResNetTrunk):
        return {key.removeprefix("net."): value for key, value in weights.items()}
    return dict(weights)


def export_checkpoint(
    path: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False
) -> Exported:
    """Export the encoder of checkpoint ``path`` in format ``fmt`` into ``out`` (default: an
    ``export`` folder beside the checkpoint), with ``MODEL.md``.

    Refuses (FileExistsError) to replace a file that is there already unless ``overwrite``;
    raises ValueError for an unknown format, a missing optional package or weights the format
    cannot hold, and :class:`ExportVerificationError` when the exported model computes other
    features than the backbone (beyond :data:`TOLERANCE`).
    """
    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown export format {fmt!r}; {hint}choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    path = Path(path)
    out = Path(out) if out is not None else path.parent / "export"
    encoder = load_encoder(path)
    target = out / (encoder.name.replace(":", "-").replace("/", "-") + _SUFFIXES[fmt])
    card_path = out / CARD_NAME
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file, not a directory; choose another --out")
    fingerprint = _fingerprint(encoder.backbone.state_dict())
    listed = _listed_files(card_path, fingerprint, overwrite=overwrite)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} exists; pass --overwrite to replace it, or choose another --out"
        )

    writers: dict[str, Callable[[Encoder], tuple[bytes, str]]] = {
        "torchvision": _torchvision_bytes,
        "safetensors": _safetensors_bytes,
        "onnx": _onnx_bytes,
        "torchscript": _torchscript_bytes,
    }
    payload, check = writers[fmt](encoder)  # built and checked in memory: nothing half-written
    make_run_directory(out)
    atomic_write(target, lambda file: file.write(payload))
    files = {**listed, target.name: fmt}
    files = {name: kind for name, kind in files.items() if (out / name).is_file()}
    atomic_write_text(card_path, model_card(encoder, files, fingerprint, out))
    return Exported(target, card_path, check)


def _listed_files(card: Path, fingerprint: str, *, overwrite: bool) -> dict[str, str]:
    """The files an earlier card in the folder lists for the same weights ({} if none); refuses
    a card of other weights, or one barlow did not write, unless ``overwrite``."""
    if not card.exists():
        return {}
    text = card.read_text(encoding="utf-8", errors="replace")
    found = _MARKER.search(text.split("\n", 1)[0])
    try:
        record = json.loads(found.group(1)) if found else None
    except json.JSONDecodeError:
        record = None
    record = record if isinstance(record, dict) else None
    if record is not None and record.get("weights_sha256") == fingerprint:
        return {str(k): str(v) for k, v in dict(record.get("files", {})).items()}
    if overwrite:
        return {}
    whose = "other weights" if record is not None else "a file barlow export did not write"
    raise FileExistsError(
        f"{card} describes {whose}; export into another --out, or pass --overwrite to replace it"
    )


def _fingerprint(weights: Mapping[str, Tensor]) -> str:
    """SHA-256 over the backbone's keys and tensor bytes: which weights an export folder holds."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        tensor = weights[key].detach().cpu().contiguous().reshape(-1)
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Formats: each returns the file's bytes and a line on the check it passed


def _torchvision_bytes(encoder: Encoder) -> tuple[bytes, str]:
    import torchvision

    weights = torchvision_state_dict(encoder)
    model = getattr(torchvision.models, encoder.name)(weights=None)
    result = model.load_state_dict(weights, strict=False)
    if set(result.missing_keys) != {"fc.weight", "fc.bias"} or result.unexpected_keys:
        raise ExportVerificationError(
            f"the converted keys do not fit torchvision's {encoder.name}: missing "
            f"{result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    buffer = io.BytesIO()
    torch.save({key: value.detach().clone() for key, value in weights.items()}, buffer)
    return buffer.getvalue(), f"loads into torchvision.models.{encoder.name}() with only fc missing"


def _safetensors_bytes(encoder: Encoder) -> tuple[bytes, str]:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().clone() for k, v in backbone_state_dict(encoder).items()}
    return save(tensors, metadata=_metadata(encoder)), ""


def _metadata(encoder: Encoder) -> dict[str, str]:
    """What a safetensors file says about its weights (safetensors metadata is str → str)."""
    backbone = encoder.backbone
    small = isinstance(backbone, ResNetTrunk) and isinstance(backbone.net.maxpool, nn.Identity)
    return {
        "format": "pt",
        "producer": f"barlow {__version__}",
        "backbone": encoder.name,
        "keys": "torchvision" if isinstance(backbone, ResNetTrunk) else "barlow",
        "small_images": json.dumps(small),
        "width": json.dumps(encoder.cfg.model.width),
        **weightless_settings(encoder.cfg),
        "in_channels": str(encoder.channels),
        "image_size": str(encoder.size),
        "mean": json.dumps(list(encoder.mean)),
        "std": json.dumps(list(encoder.std)),
        "num_features": str(int(backbone.num_features)),  # type: ignore[arg-type]
        "method": encoder.cfg.method.name,
        "dataset": encoder.cfg.data.dataset,
    }


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ValueError(
            f"--format onnx needs {' and '.join(missing)}, not installed here: "
            "pip install barlow[export]"
        )


def _onnx_bytes(encoder: Encoder) -> tuple[bytes, str]:
    import onnxruntime

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        # The torch.export-based default exporter needs onnxscript, which barlow[export] does
        # not install; the TorchScript-based one handles these convolutional nets exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        file = Path(scratch) / "backbone.onnx"
        torch.onnx.export(
            encoder.backbone,
            (encoder.example(2),),
            file,
            dynamo=False,
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
        )
        payload = file.read_bytes()
    session = onnxruntime.InferenceSession(payload, providers=["CPUExecutionProvider"])
    x = encoder.example(_CHECK_BATCH, seed=1)
    (h_onnx,) = session.run(["features"], {"images": x.numpy()})
    return payload, _compare(encoder, x, torch.from_numpy(h_onnx), "onnxruntime")


def _torchscript_bytes(encoder: Encoder) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream; it is exported because it was asked for by name
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            # no check_trace: the reloaded module is compared with the backbone below
            traced = torch.jit.trace(encoder.backbone, (encoder.example(2),), check_trace=False)
        torch.jit.save(traced, buffer)
        reloaded = torch.jit.load(io.BytesIO(buffer.getvalue()), map_location="cpu")
    x = encoder.example(_CHECK_BATCH, seed=1)
    with torch.no_grad():
        h = reloaded(x)
    return buffer.getvalue(), _compare(encoder, x, h, "the reloaded TorchScript module")


def _compare(encoder: Encoder, x: Tensor, h_exported: Tensor, what: str) -> str:
    with torch.no_grad():
        h = encoder.backbone(x)
    if h_exported.shape != h.shape:
        raise ExportVerificationError(
            f"{what} gives features of shape {tuple(h_exported.shape)}, PyTorch "
            f"{tuple(h.shape)}; the export is not written"
        )
    diff = float((h_exported.float() - h).abs().max())
    if not diff <= TOLERANCE:
        raise ExportVerificationError(
            f"{what} differs from PyTorch by up to {diff:.2e} (> {TOLERANCE:.0e}) on a random "
            f"batch of {len(x)}; the export is not written"
        )
    return f"{what} matches PyTorch on a random batch of {len(x)}: max |Δ| {diff:.1e}"


# ---------------------------------------------------------------------------------------------
# The model card


def model_card(encoder: Encoder, files: Mapping[str, str], fingerprint: str, out: Path) -> str:
    """``MODEL.md`` of the export folder ``out`` holding ``files`` ({name: format}): what the
    encoder is, how it was made and measured, the commands, how to load each file."""
    cfg, state, backbone = encoder.cfg, encoder.state, encoder.backbone
    run = _run_records(encoder.source)
    features = int(backbone.num_features)  # type: ignore[arg-type]
    marker = json.dumps({"weights_sha256": fingerprint, "files": dict(files)}, sort_keys=True)
    params = ", ".join(f"{k}={v!r}" for k, v in sorted(cfg.method.params.items())) or "defaults"
    o, t = cfg.optim, cfg.train
    epochs = f"{state.get('epoch', '?')} of {t.epochs} (global step {state.get('global_step')})"
    stop = f", stopped by train.max_steps={t.max_steps}" if t.max_steps is not None else ""
    rows = [
        ("architecture", _architecture(encoder, features)),
        ("input", _input_text(encoder)),
        ("output", f"(B, {features}) float32 features (pooled, before any projector)"),
        ("pretraining method", f"{cfg.method.name} ({params})"),
        ("dataset", _dataset_text(cfg)),
        (
            "recipe",
            f"views {cfg.data.views or 'of the method'}, {o.name}, lr {o.lr} per 256 images, "
            f"weight decay {o.weight_decay}, warm-up {o.warmup_epochs} epochs then cosine, "
            f"batch {t.batch_size}, precision {t.precision}, seed {t.seed}",
        ),
        ("epochs", epochs + stop),
        ("accuracy", _accuracy(run.get("metrics"), encoder)),
        ("weights", f"SHA-256 of the backbone tensors {fingerprint[:16]}…"),
        ("written by", f"barlow {__version__} from {encoder.source}"),
    ]
    lines = [
        f"<!-- barlow export {marker} -->",
        f"# {encoder.name} pretrained with {cfg.method.name} on {cfg.data.dataset}",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        "## Files",
        "",
    ]
    for name, kind in sorted(files.items()):
        lines += [f"### `{name}` ({kind})", "", "```python", *_loader(encoder, name, kind)]
        lines += ["```", ""]
    argv = run.get("argv")
    pretraining = _command_line(argv) if argv else "not recorded (no config.json beside it)"
    exports = [
        shlex.join(["barlow", "export", str(encoder.source), "--format", kind, "--out", str(out)])
        for kind in sorted(set(files.values()), key=FORMATS.index)
    ]
    lines += [
        "## Commands",
        "",
        f"- pretraining: `{pretraining}`",
        *(f"- export: `{command}`" for command in exports),
        "",
        "## Resolved configuration",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def _architecture(encoder: Encoder, features: int) -> str:
    backbone = encoder.backbone
    if not isinstance(backbone, ResNetTrunk):
        return f"barlow {encoder.name}, {features} features"
    small = isinstance(backbone.net.maxpool, nn.Identity)
    stem = (
        "3×3 stride-1 conv1 without max-pool (barlow's stem for small images)"
        if small
        else "torchvision's stem (7×7 stride-2 conv1, max-pool)"
    )
    return f"torchvision {encoder.name} without its classifier (fc = Identity), {stem}"


def _dataset_text(cfg: Config) -> str:
    info = data.DATASETS.get(cfg.data.dataset)
    if info is None:
        return f"the image folder {cfg.data.dataset}"
    size = f" ({info.train_size:,} training images)" if info.train_size else ""
    return f"{cfg.data.dataset}{size}"


def _input_text(encoder: Encoder) -> str:
    folder = encoder.cfg.data.dataset not in data.DATASETS
    resize = (
        f"shorter side resized to {round(encoder.size * 256 / 224)} px, centre crop"
        if folder
        else "resized"
    )
    colour = "RGB" if encoder.channels == 3 else f"{encoder.channels}-channel"
    return (
        f"(B, {encoder.channels}, {encoder.size}, {encoder.size}) float32 {colour} images "
        f"({resize} to {encoder.size} px), pixels scaled to [0, 1], then (x − mean) / std with "
        f"mean {list(encoder.mean)}, std {list(encoder.std)}"
    )


def _run_records(source: Path) -> dict[str, Any]:
    """``argv`` from the run's config.json and its metrics.json, when they describe ``source``:
    they do for the run's ``checkpoint.pt`` (a snapshot may predate the measurements)."""
    found: dict[str, Any] = {}
    config, metrics = source.parent / CONFIG_NAME, source.parent / METRICS_NAME
    try:
        if config.is_file():
            found["argv"] = json.loads(config.read_text(encoding="utf-8")).get("argv")
        if metrics.is_file() and source.name == CHECKPOINT_NAME:
            found["metrics"] = json.loads(metrics.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, AttributeError):
        pass  # a damaged record leaves a line of the card "not recorded", not the export undone
    return found


def _accuracy(metrics: Any, encoder: Encoder) -> str:
    if not isinstance(metrics, dict):
        hint = "" if encoder.source.name == CHECKPOINT_NAME else " for this snapshot"
        return f"not measured{hint} (`barlow knn` / `barlow linear` on the checkpoint measure it)"
    cfg, found = encoder.cfg, []
    final = metrics.get("evaluation", {}).get("pretrained", {})
    if "knn_top1" in final:
        found.append(f"kNN top-1 {_percent(final['knn_top1'])} (k {cfg.eval.knn_k}, final)")
    if "linear_top1" in final:
        found.append(f"linear probe top-1 {_percent(final['linear_top1'])} (final)")
    knn = metrics.get("knn", {})
    if "knn_top1" in knn:
        found.append(f"kNN top-1 {_percent(knn['knn_top1'])} (k {knn.get('k')}, `barlow knn`)")
    if "test_acc" in metrics.get("linear_probe", {}):
        found.append(f"linear probe top-1 {_percent(metrics['linear_probe']['test_acc'])}")
    if "top1" in metrics.get("linear_paper", {}):
        found.append(f"linear top-1 {_percent(metrics['linear_paper']['top1'])} (paper protocol)")
    where = f" on the {cfg.data.dataset} test split" if found else ""
    return ("; ".join(found) + where) if found else "not measured (metrics.json holds none)"


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f} %" if isinstance(value, int | float) else str(value)


def _command_line(argv: list[str]) -> str:
    program = Path(argv[0]).name
    program = "python -m barlow" if program == "__main__.py" else program
    return " ".join([program, *map(shlex.quote, argv[1:])])


def _small_cnn_arguments(encoder: Encoder) -> str:
    """``, width=W`` and ``, grid=G`` for what the run set of ``model.width`` and
    ``model.feature_grid`` (small_cnn), else nothing."""
    model = encoder.cfg.model
    given = {"width": model.width, "grid": model.feature_grid}
    return "".join(f", {name}={value}" for name, value in given.items() if value is not None)


def _loader(encoder: Encoder, name: str, kind: str) -> list[str]:
    """Three lines of Python that load ``name`` and give features."""
    arch, c, s = encoder.name, encoder.channels, encoder.size
    stock = (
        isinstance(encoder.backbone, ResNetTrunk)
        and c == 3
        and isinstance(encoder.backbone.net.maxpool, nn.MaxPool2d)
    )
    small = not stock and isinstance(encoder.backbone, ResNetTrunk)
    if kind == "torchvision" or (kind == "safetensors" and stock):
        read = (
            f'torch.load("{name}", weights_only=True)'
            if kind == "torchvision"
            else f'safetensors.torch.load_file("{name}")'
        )
        imports = "import torch, torchvision" + (
            ", safetensors.torch" if kind == "safetensors" else ""
        )
        return [
            imports,
            f"model = torchvision.models.{arch}(); model.fc = torch.nn.Identity()",
            f"model.load_state_dict({read}); model.eval()  # (B, {c}, {s}, {s}) → features",
        ]
    if kind == "safetensors":
        build = (
            f'create_backbone("{arch}", in_channels={c}, small_images={small}).net'
            if isinstance(encoder.backbone, ResNetTrunk)
            else f'create_backbone("{arch}", in_channels={c}{_small_cnn_arguments(encoder)})'
        )
        return [
            "import safetensors.torch; from barlow.backbones import create_backbone",
            f"model = {build}",
            f'model.load_state_dict(safetensors.torch.load_file("{name}")); model.eval()',
        ]
    if kind == "onnx":
        return [
            "import numpy as np, onnxruntime",
            f'session = onnxruntime.InferenceSession("{name}")',
            f'h = session.run(None, {{"images": np.zeros((1, {c}, {s}, {s}), np.float32)}})[0]',
        ]
    return [
        "import torch",
        f'model = torch.jit.load("{name}").eval()',
        f"h = model(torch.zeros(1, {c}, {s}, {s}))  # (1, num_features)",
    ]


__all__ = [
    "CARD_NAME",
    "FORMATS",
    "TOLERANCE",
    "Encoder",
    "ExportVerificationError",
    "Exported",
    "backbone_state_dict",
    "export_checkpoint",
    "load_encoder",
    "model_card",
    "torchvision_state_dict",
]
