"""Run configuration: frozen dataclasses, TOML recipes and ``--set key=value`` overrides.

A recipe holds only what differs from the code defaults. Method hyper-parameters are not copied
here: ``[method]`` keys are checked against the method class's keyword arguments, whose defaults
are the single home of each value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from barlow.methods.base import Method

# The enumerated settings: the type is the one check (``_coerce`` names the choices).
OptimizerName = Literal["lars", "sgd", "adamw"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 where native, else fp32
AugmentOn = Literal["workers", "device"]
WandbMode = Literal["online", "offline", "disabled"]


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # a name in data.DATASETS, or a directory of images
    root: str | None = None  # where the dataset's files are (None: its default places)
    download: bool = False  # torchvision datasets are downloaded only when this is true
    views: str | None = None  # view recipe in augment.RECIPES; None: the method's, fit to the data
    # ViewSpec settings changed in every view of the recipe, e.g. {solarize_p = 0.0} (the
    # augmentation ablations): `--set 'data.view_changes={flip_p=0.0, jitter_p=0.0}'`
    view_changes: dict[str, Any] = field(default_factory=dict)
    crop_size: int | None = None  # None: the dataset's image size
    # Progressive resolution: the crop side of the first epoch, growing linearly to the full side
    # (crop_size, else the image size) by epoch crop_ramp_epochs (None: half of train.epochs);
    # early epochs cost ~(start / full)² of a full one. None: the full side throughout
    start_crop_size: int | None = None
    crop_ramp_epochs: int | None = None
    num_workers: int = 0  # DataLoader workers; 0 augments in the training process
    # Where the views are drawn: "workers" per sample with torchvision in the DataLoader, or
    # "device": whole uint8 batches at once on the training device (batched_views; datasets held
    # in memory: digits, fashion-mnist, cifar10/100, stl10).
    augment_on: AugmentOn = "workers"
    # An image that cannot be decoded stops the run with an error naming the file; true drops it
    # from its batch instead, counted and reported every epoch (`barlow pretrain --skip-corrupt`).
    skip_corrupt: bool = False
    # Pretrain on N training images only, drawn at random with seed 0 (None: all): a quick
    # study on a slice. The evaluation keeps the full labelled splits.
    train_subset: int | None = None
    # Hold N labelled training images out (a draw seeded apart from train_subset's): pretraining
    # never sees them and the evaluation scores on them instead of the test split, so recipes
    # are chosen without the test labels (0: none; datasets pretrained on their train split)
    holdout: int = 0


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "small_cnn"  # resnet18|resnet34|resnet50|small_cnn|timm:<name>
    small_images: bool | None = None  # 3×3 stem without max-pool; None: images ≤ 64 px
    # small_cnn's first-block channels (each later block doubles them; features = 8 × width);
    # None: its default 32. The other backbones fix their own widths and reject it
    width: int | None = None
    # small_cnn's pooled layout: its last map average-pooled to G × G cells, concatenated
    # (features = 8 × width × G², same compute); None: 1, global average pooling
    feature_grid: int | None = None


@dataclass(frozen=True)
class MethodConfig:
    name: str = "barlow_twins"
    params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of METHODS[name]


@dataclass(frozen=True)
class OptimConfig:
    name: OptimizerName = "lars"
    lr: float = 0.2  # learning rate for weights per 256 images (scaled by batch_size / 256)
    bias_lr: float | None = None  # for biases and norm layers, per 256 images; None: same as lr
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    eta: float = 0.001  # LARS trust coefficient
    warmup_epochs: float = 10.0
    final_lr_ratio: float = 0.001  # cosine ends at lr × this


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # global: split over processes, which must divide it
    precision: PrecisionName = "auto"  # auto: bf16 where native (GPU, AVX512-BF16/AMX CPU)
    seed: int = 0
    device: str = "auto"  # auto|cpu|cuda|cuda:N
    log_every: int = 20  # steps between JSON-lines records
    checkpoint_every: int = 1  # epochs
    sync_batchnorm: bool = True  # under DDP on GPU; SyncBatchNorm does not run on CPU
    channels_last: bool = True  # NHWC convolutions (GPU and CPU)
    compile: bool = False  # torch.compile the method
    max_steps: int | None = None  # stop after this many steps (mid-epoch; resumable)
    skip_nonfinite: int = 0  # steps with a NaN/inf loss that may be skipped before the run stops
    requeue: bool = False  # on a preemption signal under SLURM, also `scontrol requeue` the job
    keep_last: int = 2  # step-numbered snapshots kept beside checkpoint.pt (0: none)
    abort_on_collapse: bool = False  # stop (instead of warning) when the embeddings collapse
    # Seconds a collective waits for the other processes before failing: a rank that hangs or
    # died ends the others within this bound instead of leaving them blocked forever.
    dist_timeout_s: float = 1800.0
    # With --resume, a checkpoint of a run whose method / model / batch / dataset differ gives
    # its weights (the schedule, optimizer and step counters start fresh) instead of an error.
    resume_weights_only: bool = False
    # torch's intra-op threads: 0 adapts them to the cores other processes leave free
    # (barlow.cpu_share: two jobs on one machine stop stalling each other); N fixes them
    threads: int = 0


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    online_knn_every: int = 1  # epochs between kNN evaluations during pretraining; 0: never
    # a linear classifier trained beside pretraining on detached features (labelled data only);
    # its test accuracy is measured with the online kNN
    online_linear: bool = True
    online_linear_lr: float = 0.1
    # <run>/insight/: cross-correlation, spectra and RankMe of a fixed probe batch at epoch 0,
    # at each online-kNN epoch and at the last (barlow.insight)
    insight: bool = True
    final: bool = True  # kNN + linear probe when pretraining ends
    baselines: bool = False  # also evaluate a random-init encoder and raw pixels
    probe_epochs: int = 100  # fast linear probe on frozen features
    protocol_epochs: int = 100  # the paper's linear evaluation (`barlow linear --protocol paper`)
    protocol_lr: float = 0.3  # per 256 images
    batch_size: int = 256


@dataclass(frozen=True)
class FinetuneConfig:
    """``barlow finetune``: the labelled subset and the classifier head's learning rate (the
    backbone's is ``optim.lr``; both per 256 images)."""

    labels: str = "10%"  # "1%" | "10%" | N labelled images in all (class-stratified) | index file
    head_lr: float = 0.5
    baselines: bool = True  # also the same encoder from scratch, and a probe on the frozen one


@dataclass(frozen=True)
class LogConfig:
    """Where a run's records go besides ``metrics.jsonl`` (always written; main process only)."""

    tensorboard: bool = True  # event files in <run>/tensorboard/
    wandb: bool = False  # a Weights & Biases run (pip install barlow[wandb]); files in <run>/wandb/
    wandb_project: str = "barlow"
    wandb_entity: str | None = None  # None: the logged-in user's default entity
    # None: WANDB_MODE if set, else online; "offline" needs no network or key (`wandb sync` later)
    wandb_mode: WandbMode | None = None


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON- and ``weights_only``-safe)."""
        return dataclasses.asdict(self)


# Resolved types: with postponed annotations, dataclasses.Field.type is only a string.
SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _closest(name: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _outside_a_section(key: str, value: Any) -> str:
    """The error for a plain ``key = value`` at a recipe's top level, naming its section."""
    if key in SECTIONS:
        return f"config section [{key}] must be a table, got {value!r}"
    owners = [
        name
        for name, cls in SECTIONS.items()
        if dataclasses.is_dataclass(cls) and key in {f.name for f in dataclasses.fields(cls)}
    ]
    where = (
        f"it belongs in [{owners[0]}]: write it below that header, or pass "
        f"--set {owners[0]}.{key}={value!r}"
        if owners
        else f"top-level names are sections ({', '.join(f'[{s}]' for s in SECTIONS)})"
    )
    return f"recipe setting {key} = {value!r} stands outside any [section]; {where}"


def _method_class(name: str) -> type[Method]:
    from barlow.methods import method_class  # late import: config must not pull in torch models

    return method_class(name)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a simple annotation (int/float/bool/str/Literal/Optional)."""
    if isinstance(annotation, str):  # unresolved forward reference: accept as is
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(value)
    return value


def _check_ranges(cfg: Config) -> None:
    """Value checks that types cannot express; each message names the key and the valid range."""
    rules = _optim_and_train_rules(cfg) + _data_eval_and_finetune_rules(cfg)
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    _check_view_changes(cfg.data.view_changes)


def _check_view_changes(changes: Any) -> None:
    """``data.view_changes``: checked where the views are built (``augment``)."""
    from barlow.augment import check_view_changes

    check_view_changes(changes)


def _optim_and_train_rules(cfg: Config) -> list[tuple[bool, str]]:
    return [
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (
            cfg.optim.bias_lr is None or cfg.optim.bias_lr >= 0,
            f"optim.bias_lr must be >= 0, got {cfg.optim.bias_lr}",
        ),
        (
            cfg.optim.weight_decay >= 0,
            f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}",
        ),
        (
            0 <= cfg.optim.momentum < 1,
            f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}",
        ),
        (cfg.optim.eta > 0, f"optim.eta must be > 0, got {cfg.optim.eta}"),
        (
            cfg.optim.warmup_epochs >= 0,
            f"optim.warmup_epochs must be >= 0, got {cfg.optim.warmup_epochs}",
        ),
        (
            0 <= cfg.optim.final_lr_ratio <= 1,
            f"optim.final_lr_ratio must be in [0, 1], got {cfg.optim.final_lr_ratio}",
        ),
        (cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}"),
        (
            cfg.train.batch_size >= 2,
            "train.batch_size must be >= 2 (the loss standardises along the batch), "
            f"got {cfg.train.batch_size}",
        ),
        (cfg.train.log_every >= 1, f"train.log_every must be >= 1, got {cfg.train.log_every}"),
        (
            cfg.train.checkpoint_every >= 1,
            f"train.checkpoint_every must be >= 1, got {cfg.train.checkpoint_every}",
        ),
        (
            cfg.train.max_steps is None or cfg.train.max_steps >= 1,
            f"train.max_steps must be >= 1, got {cfg.train.max_steps}",
        ),
        (cfg.train.keep_last >= 0, f"train.keep_last must be >= 0, got {cfg.train.keep_last}"),
        (
            cfg.train.threads >= 0,
            f"train.threads must be >= 0 (0: adapt to the machine's load), got {cfg.train.threads}",
        ),
        (
            cfg.train.dist_timeout_s > 0,
            f"train.dist_timeout_s must be > 0 seconds, got {cfg.train.dist_timeout_s}",
        ),
        (
            cfg.train.skip_nonfinite >= 0,
            f"train.skip_nonfinite must be >= 0 (0: stop at the first), got "
            f"{cfg.train.skip_nonfinite}",
        ),
    ]


def crop_ramp_epochs(cfg: Config) -> int:
    """The epoch at which progressive resolution reaches the full side: data.crop_ramp_epochs,
    else half of train.epochs (at least 1)."""
    return cfg.data.crop_ramp_epochs or max(1, cfg.train.epochs // 2)


def _data_eval_and_finetune_rules(cfg: Config) -> list[tuple[bool, str]]:
    return [
        (cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}"),
        (
            cfg.data.train_subset is None or cfg.data.train_subset >= 2,
            f"data.train_subset must be >= 2 images, got {cfg.data.train_subset}",
        ),
        (cfg.data.holdout >= 0, f"data.holdout must be >= 0 images, got {cfg.data.holdout}"),
        (
            cfg.data.crop_size is None or cfg.data.crop_size >= 4,
            f"data.crop_size must be >= 4, got {cfg.data.crop_size}",
        ),
        (
            cfg.data.start_crop_size is None or cfg.data.start_crop_size >= 4,
            f"data.start_crop_size must be >= 4 px, got {cfg.data.start_crop_size}",
        ),
        (
            cfg.data.crop_ramp_epochs is None
            or (cfg.data.start_crop_size is not None and cfg.data.crop_ramp_epochs >= 1),
            f"data.crop_ramp_epochs={cfg.data.crop_ramp_epochs} needs data.start_crop_size set "
            "and at least 1 epoch",
        ),
        (
            cfg.data.start_crop_size is None or crop_ramp_epochs(cfg) < cfg.train.epochs,
            f"data.start_crop_size: the crop ramp must reach the full side before the last epoch "
            f"(data.crop_ramp_epochs={cfg.data.crop_ramp_epochs}, train.epochs="
            f"{cfg.train.epochs}); set data.crop_ramp_epochs below train.epochs",
        ),
        (cfg.eval.knn_k >= 1, f"eval.knn_k must be >= 1, got {cfg.eval.knn_k}"),
        (
            cfg.eval.knn_temperature > 0,
            f"eval.knn_temperature must be > 0, got {cfg.eval.knn_temperature}",
        ),
        (
            cfg.eval.online_knn_every >= 0,
            f"eval.online_knn_every must be >= 0, got {cfg.eval.online_knn_every}",
        ),
        (
            cfg.eval.online_linear_lr > 0,
            f"eval.online_linear_lr must be > 0, got {cfg.eval.online_linear_lr}",
        ),
        (
            cfg.eval.probe_epochs >= 1,
            f"eval.probe_epochs must be >= 1, got {cfg.eval.probe_epochs}",
        ),
        (
            cfg.eval.protocol_epochs >= 1,
            f"eval.protocol_epochs must be >= 1, got {cfg.eval.protocol_epochs}",
        ),
        (cfg.eval.protocol_lr > 0, f"eval.protocol_lr must be > 0, got {cfg.eval.protocol_lr}"),
        (cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}"),
        (
            cfg.finetune.head_lr >= 0,
            f"finetune.head_lr must be >= 0, got {cfg.finetune.head_lr}",
        ),
    ]


def _check_names(cfg: Config) -> None:
    """Registry names (backbone, view recipe) fail here, not minutes later at model build."""
    from barlow.augment import RECIPES
    from barlow.backbones import BACKBONES, TIMM_PREFIX, timm_model_name

    backbone = cfg.model.backbone
    if backbone.startswith(TIMM_PREFIX):
        try:
            timm_model_name(backbone)  # timm installed, and the model registered
        except ValueError as exc:
            raise ValueError(f"model.backbone: {exc}") from exc
    elif backbone not in BACKBONES:
        raise ValueError(
            f"model.backbone: unknown backbone {backbone!r}{_closest(backbone, BACKBONES)} "
            f"(valid: {', '.join(BACKBONES)}, or timm:<name>)"
        )
    width = cfg.model.width
    if width is not None and (backbone != "small_cnn" or width < 1):
        raise ValueError(
            f"model.width={width}: only small_cnn takes a width, and it must be >= 1 "
            f"(backbone {backbone!r}; leave model.width unset for the backbone's own widths)"
        )
    grid = cfg.model.feature_grid
    if grid is not None and (backbone != "small_cnn" or grid < 1):
        raise ValueError(
            f"model.feature_grid={grid}: only small_cnn takes a feature grid, and it must be "
            f">= 1 (backbone {backbone!r}; leave model.feature_grid unset for global pooling)"
        )
    views = cfg.data.views
    if views is not None and views not in RECIPES:
        raise ValueError(
            f"data.views: unknown view recipe {views!r}{_closest(views, RECIPES)} "
            f"(valid: {', '.join(RECIPES)})"
        )


def _validate_method(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    from barlow.methods import method_parameters

    legal = method_parameters(name)
    checked: dict[str, Any] = {}
    method_cls = _method_class(name)
    hints = typing.get_type_hints(method_cls.__init__)
    for key, value in params.items():
        if key not in legal:
            raise ValueError(
                f"unknown key method.{key} for method {name!r}{_closest(key, legal)} "
                f"(valid: {', '.join(legal)})"
            )
        checked[key] = _coerce(value, hints.get(key, legal[key].annotation), f"method.{key}")
    for key in ("projector", "predictor"):
        if isinstance(checked.get(key), str):
            from barlow.heads import parse_spec

            try:
                parse_spec(checked[key])
            except ValueError as exc:
                raise ValueError(f"method.{key}: {exc}") from exc
    return checked


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (a parsed recipe or a saved config)."""
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        if not isinstance(values, Mapping):
            raise ValueError(_outside_a_section(section, values))
        if section not in SECTIONS:
            raise ValueError(f"unknown config section [{section}]{_closest(section, SECTIONS)}")
        sections[section] = dict(values)

    method_raw = sections.pop("method", {})
    method_name = method_raw.pop("name", MethodConfig.name)
    if not isinstance(method_name, str):
        raise ValueError(f"method.name must be a string, got {method_name!r}")
    params_raw = method_raw.pop("params", {})
    if not isinstance(params_raw, Mapping):
        raise ValueError(f"method.params must be a table, got {params_raw!r}")
    method_params = dict(params_raw)
    method_params.update(method_raw)
    method = MethodConfig(name=method_name, params=_validate_method(method_name, method_params))

    built: dict[str, Any] = {"method": method}
    for section, values in sections.items():
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in hints:
                raise ValueError(f"unknown key {section}.{key}{_closest(key, hints)}")
        built[section] = cls(
            **{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
        )
    cfg = Config(**built)
    _check_ranges(cfg)
    _check_names(cfg)
    return cfg


def _accepts_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(a, str) for a in args)
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and any(
        _accepts_str(a) for a in args
    )


def _field_annotation(section: str, name: str, method_name: str) -> Any:
    """The annotation of ``section.name`` (None where the key is unknown: from_dict says so)."""
    if section == "method":
        try:
            return typing.get_type_hints(_method_class(method_name).__init__).get(name)
        except ValueError:
            return None
    if section in SECTIONS:
        return typing.get_type_hints(SECTIONS[section]).get(name)
    return None


def _parse_value(text: str, annotation: Any = None) -> Any:
    """TOML value syntax for overrides (``0.3``, ``true``, ``"x"``, ``[1, 2]``).

    Bare words are strings, and so is any unquoted text given to a string field, so that
    ``method.projector=8192`` or ``data.root=2024`` are not read as numbers.
    """
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if not isinstance(value, str) and annotation is not None and _accepts_str(annotation):
        return text
    return value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested recipe dict (returns a new dict)."""
    # non-table values are kept as they are: from_dict names them
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(
                f"override {item!r} must look like section.key=value, e.g. optim.lr=0.3"
            )
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"override {item!r}: [{section}] in the recipe is not a table")
        method_table = out.get("method")
        method_name = MethodConfig.name
        if isinstance(method_table, dict):
            method_name = str(method_table.get("name", method_name))
        annotation = _field_annotation(section, name, method_name)
        table[name] = _parse_value(value.strip(), annotation)
    return out


def shipped_recipes() -> dict[str, Path]:
    """Recipes packaged with barlow, by name (file stem)."""
    folder = resources.files("barlow") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """Parse a shipped recipe by name, or a TOML file by path (``tomllib``: no code runs)."""
    recipes = shipped_recipes()
    path = recipes.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise FileNotFoundError(
            f"no recipe {name_or_path!r}: not a shipped recipe ({', '.join(sorted(recipes))}) "
            f"nor a TOML file{_closest(name_or_path, recipes)}"
        )
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"recipe {path} is not valid TOML: {exc}") from exc


def load_config(recipe: str = "digits", overrides: Iterable[str] = ()) -> Config:
    """Recipe + overrides → a validated Config."""
    return from_dict(apply_overrides(read_recipe(recipe), overrides))
