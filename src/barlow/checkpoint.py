"""Atomic checkpoint writes, validated ``weights_only`` loads, RNG state, and backbone export.

A checkpoint is a dict of plain values (tensors, numbers, strings, ``None``, lists, tuples,
dicts) stamped with ``format_version``. Plain values are what ``torch.load(weights_only=True)``
can rebuild without running code from the file, so loading someone else's checkpoint never
executes it. Writes go to a temporary file in the same directory and are renamed over the
target, so a crash or a full disk leaves the previous checkpoint intact.

A run directory holds ``checkpoint.pt`` (the latest) and, with :func:`retain`, snapshots
``checkpoint-step00001234.pt`` of the last K saves. :func:`latest_valid_checkpoint` picks the newest
one that loads and is complete, skipping (with a warning) files a crash or a bad disk damaged.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from barlow.rundir import CHECKPOINT_NAME, atomic_write, fsync_directory

FORMAT_VERSION: int = 1

LATEST_NAME = CHECKPOINT_NAME  # the file name is the run directory's (rundir.py)
_SNAPSHOT = re.compile(r"checkpoint-step(\d+)\.pt")
# temp files of rundir.atomic_write for checkpoint.pt and its snapshots
_CHECKPOINT_TEMP = re.compile(r"\.checkpoint[^/]*\.pt\..+\.tmp")
_MIN_SAFE_TORCH = "2.6"  # weights_only=True could be bypassed up to 2.5.1 (CVE-2025-32434)

_PLAIN_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_PLAIN_KEYS = (str, int, float, bool, type(None))
_PLAIN_MAPPINGS = (dict, OrderedDict)  # OrderedDict: what nn.Module.state_dict() returns
_PLAIN_SEQUENCES = (list, tuple)
_PLAIN_TENSORS = (Tensor, nn.Parameter)


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write ``state`` plus ``format_version`` to ``path`` atomically.

    Refuses, before touching the disk, values ``torch.load(weights_only=True)`` could not read
    back (TypeError) and non-finite floating tensors (ValueError), naming the key path. Parent
    directories are created.
    """
    path = Path(path)
    if state.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(
            f"state['format_version'] is {state['format_version']!r} but this barlow writes "
            f"version {FORMAT_VERSION}; leave the key out and save_checkpoint stamps it"
        )
    payload = {**state, "format_version": FORMAT_VERSION}
    check_plain(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda file: torch.save(payload, file))
    except (OSError, RuntimeError) as error:
        full = _disk_full(error)
        if full is None:
            raise
        refused = CheckpointWriteError(_disk_full_message(path, payload))
        refused.errno = full.errno
        raise refused from error


class CheckpointWriteError(OSError):
    """A checkpoint could not be written for lack of space; the previous one is intact."""


def _disk_full(error: BaseException) -> OSError | None:
    """The "no space" / "quota exceeded" OSError behind ``error``: torch's zip writer reports
    it as "enforce fail at inline_container.cc", with the OSError as its context."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _disk_full_message(path: Path, payload: Mapping[str, Any]) -> str:
    size = sum(t.numel() * t.element_size() for _, t in _tensors(payload, "state"))
    free = shutil.disk_usage(path.parent).free
    previous = (
        f"{path} from the previous save is intact"
        if path.exists()
        else "no checkpoint was written before"
    )
    return (
        f"no space left on the device to write {path} (it needs about {size / 2**20:.0f} MiB, "
        f"{free / 2**20:.0f} MiB are free there); {previous}. Free some space, or lower "
        "train.keep_last (each snapshot is a copy), then continue with --resume"
    )


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises FileNotFoundError if ``path`` is missing, ValueError if it is not a readable barlow
    checkpoint (truncated, corrupt, holding code objects, or without ``format_version``).
    """
    path = Path(path)
    state = _weights_only_load(path, map_location)
    if not isinstance(state, dict) or "format_version" not in state:
        raise ValueError(
            f"{path} is not a barlow checkpoint: expected a dict with 'format_version', "
            f"got {type(state).__name__}"
            + (f" with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else "")
        )
    version = state["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format_version {version!r}, newer than this barlow reads "
            f"({FORMAT_VERSION}); upgrade barlow to load it"
        )
    return state


def check_plain(value: Any, key_path: str = "state") -> None:
    """Raise unless ``value`` is built only from plain types and its float tensors are finite.

    The error names the offending entry as a key path, e.g. ``state['model']['fc.weight']``.
    """
    if isinstance(value, Tensor):
        if type(value) not in _PLAIN_TENSORS:
            raise TypeError(f"{key_path} is a {type(value).__name__}; save a plain torch.Tensor")
        floating = value.is_floating_point() or value.is_complex()
        if floating and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{key_path} holds NaN or infinite values; refusing to write a checkpoint "
                "that cannot be resumed (the run diverged before this save)"
            )
    elif type(value) in _PLAIN_MAPPINGS:
        for key, item in value.items():
            if type(key) not in _PLAIN_KEYS:
                raise TypeError(
                    f"{key_path} has a key of type {type(key).__name__} ({key!r}); "
                    "use str or int keys"
                )
            check_plain(item, f"{key_path}[{key!r}]")
    elif type(value) in _PLAIN_SEQUENCES:
        for index, item in enumerate(value):
            check_plain(item, f"{key_path}[{index}]")
    elif type(value) not in _PLAIN_SCALARS:
        raise TypeError(
            f"{key_path} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints "
            "hold only tensors, numbers, str, bytes, None, lists, tuples and dicts, so they load "
            "with weights_only=True (convert it, e.g. dataclasses.asdict or torch.from_numpy)"
        )


def validate_checkpoint(
    path: str | Path,
    *,
    required_keys: tuple[str, ...],
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load ``path`` (see :func:`load_checkpoint`) and check it is complete: every key of
    ``required_keys`` present and every floating tensor finite. Returns the loaded state.

    Raises ValueError naming the file and what is wrong (FileNotFoundError if it is missing).
    """
    path = Path(path)
    state = load_checkpoint(path, map_location=map_location)
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise ValueError(
            f"{path} is incomplete: it lacks {missing}, so it cannot resume a run "
            "(written by another tool or an older barlow?)"
        )
    for key_path, tensor in _tensors(state, "state"):
        floating = tensor.is_floating_point() or tensor.is_complex()
        if floating and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path} is corrupt: {key_path} holds NaN or infinite values")
    return state


def snapshot_name(global_step: int) -> str:
    """File name of the snapshot :func:`retain` keeps of the checkpoint at ``global_step``."""
    return f"checkpoint-step{global_step:08d}.pt"


def latest_valid_checkpoint(run_dir: str | Path, *, required_keys: tuple[str, ...]) -> Path | None:
    """The newest checkpoint in ``run_dir`` that passes :func:`validate_checkpoint`, or None.

    Candidates are ``checkpoint.pt`` and the snapshots ``checkpoint-step<N>.pt``; newest means
    the largest ``global_step`` (read from ``checkpoint.pt``, from the name for snapshots). Files
    that fail validation (truncated, corrupt, incomplete) are skipped with a RuntimeWarning naming
    each. Only files newer than the first valid one are opened.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    skipped: list[str] = []
    best: tuple[int, Path] | None = None
    latest = run_dir / LATEST_NAME
    if latest.is_file():
        try:
            state = validate_checkpoint(latest, required_keys=required_keys)
            best = (int(state.get("global_step", -1)), latest)
        except ValueError as error:
            skipped.append(str(error))
    for step, path in sorted(_snapshots(run_dir), reverse=True):
        if best is not None and step <= best[0]:
            break
        try:
            validate_checkpoint(path, required_keys=required_keys)
        except ValueError as error:
            skipped.append(str(error))
            continue
        best = (step, path)
        break
    for reason in skipped:
        chosen = f"using {best[1]}" if best is not None else "no valid checkpoint is left"
        warnings.warn(f"skipping checkpoint: {reason}; {chosen}", RuntimeWarning, stacklevel=2)
    return best[1] if best is not None else None


def retain(run_dir: str | Path, *, keep_last: int, required_keys: tuple[str, ...]) -> list[Path]:
    """Snapshot ``run_dir/checkpoint.pt`` and keep only the ``keep_last`` newest snapshots.

    Call it right after :func:`save_checkpoint` wrote ``checkpoint.pt``. It first validates that
    file (raising, and deleting nothing, if it is not a complete checkpoint), then copies it to
    ``checkpoint-step<global_step>.pt`` (atomically; an independent copy, so damage done to one
    in place leaves the other), then deletes older snapshots beyond the ``keep_last`` newest,
    snapshots newer than this one (left by a timeline the run abandoned when it resumed from an
    earlier step), and temp files of saves a killed process left. ``keep_last=0`` keeps
    ``checkpoint.pt`` alone. Other files (``best.pt``, exports) are never touched. Returns the
    deleted paths.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be an int >= 0 (0: no snapshots), got {keep_last!r}")
    run_dir = Path(run_dir)
    latest = run_dir / LATEST_NAME
    state = validate_checkpoint(latest, required_keys=required_keys)
    step = int(state["global_step"])
    if keep_last:
        _copy_atomically(latest, run_dir / snapshot_name(step))
    older = sorted((s, p) for s, p in _snapshots(run_dir) if s <= step)
    doomed = [p for s, p in _snapshots(run_dir) if s > step]
    doomed += [p for _, p in older[: max(len(older) - keep_last, 0)]]
    doomed += [run_dir / name for name in os.listdir(run_dir) if _CHECKPOINT_TEMP.fullmatch(name)]
    for path in doomed:
        path.unlink(missing_ok=True)
    if doomed:
        fsync_directory(run_dir)
    return doomed


def _snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    found = (_SNAPSHOT.fullmatch(name) for name in os.listdir(run_dir))
    return [(int(m.group(1)), run_dir / m.group(0)) for m in found if m]


def _copy_atomically(source: Path, target: Path) -> None:
    """Make ``target`` an independent copy of ``source``, replacing any existing ``target``
    atomically. A copy, not a hard link: damage written into one file in place must not reach
    the other (on copy-on-write file systems the kernel's copy shares blocks until then)."""
    with open(source, "rb") as file:
        atomic_write(target, lambda out: shutil.copyfileobj(file, out, 1 << 20))


def _tensors(value: Any, key_path: str) -> Any:
    """Yield (key path, tensor) for every tensor nested in dicts, lists and tuples."""
    if isinstance(value, Tensor):
        yield key_path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{key_path}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{key_path}[{index}]")


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and ``random``.

    Returned as plain values, so it can go into a checkpoint.
    """
    numpy_state = np.random.get_state(legacy=False)
    python_version, python_internal, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(numpy_state["bit_generator"]),
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": {
            "version": python_version,
            "internal": list(python_internal),
            "gauss_next": python_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state`.

    CUDA states are restored for the devices present in both the state and this machine; a
    different device count only warns, since resuming on other hardware is legitimate.
    """
    missing = {"torch", "numpy", "python"} - set(state)
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}; pass what rng_state() returned")
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].cpu().numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
    )
    _set_cuda_rng_state(state.get("cuda"))


def _set_cuda_rng_state(cuda_states: list[Tensor] | None) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    saved = len(cuda_states) if cuda_states is not None else 0
    if saved != available:
        warnings.warn(
            f"RNG state holds {saved} CUDA device(s), this machine has {available}: CUDA random "
            "streams are restored for the first min of the two only",
            RuntimeWarning,
            stacklevel=3,
        )
    for device, device_state in enumerate((cuda_states or [])[:available]):
        torch.cuda.set_rng_state(device_state.cpu(), device=device)


def load_backbone_weights(module: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load ``state_dict`` into ``module`` strictly, with one error listing every mismatch.

    Raises ValueError naming missing and unexpected keys (first few, with counts) and shape
    mismatches, and a prefix to strip or add when that explains them (e.g. ``module.``).
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    problems = [
        _listing("missing keys", missing),
        _listing("unexpected keys", unexpected),
        _listing("shape mismatches", mismatched),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        hint = _prefix_hint(missing, unexpected)
        raise ValueError(
            f"weights do not fit {type(module).__name__}: " + "; ".join(problems) + hint
        )
    module.load_state_dict(dict(state_dict), strict=True)


def load_method_weights(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str
) -> None:
    """:func:`load_backbone_weights` of a checkpoint's ``method`` entry into the method its own
    config builds; the ValueError says the file (``source``) does not fit its own config."""
    try:
        load_backbone_weights(module, state_dict)
    except ValueError as error:
        raise ValueError(
            f"{source} does not fit the model its own config describes ({error}): the file or "
            "the config inside it was edited, or another program wrote it. Use the checkpoint "
            "as its run wrote it (a snapshot checkpoint-step<N>.pt beside it may be intact), or "
            "start a new run (--overwrite, or another --out)"
        ) from None


def export_backbone(
    state_dict: Mapping[str, Tensor], path: str | Path, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write backbone weights alone, atomically: safetensors for a ``.safetensors`` path,
    otherwise a ``torch.save`` of a flat ``{name: tensor}`` dict (loadable with weights_only).

    The format follows the file name so the file says what it is; read either with
    :func:`load_exported_backbone`. ``metadata`` (safetensors only) records what the weights
    alone do not say, e.g. small_cnn's ``feature_grid``; the header is key-sorted so the same
    content gives the same bytes in every process.
    """
    path = Path(path)
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
    check_plain(dict(state_dict), "state_dict")
    # clone: a view would otherwise drag its whole storage into the file, and safetensors
    # refuses tensors that share memory
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors_torch = _import_safetensors()
        data = sorted_header(
            safetensors_torch.save(tensors, metadata={"format": "pt", **(metadata or {})})
        )
        atomic_write(path, lambda file: file.write(data))
    else:
        atomic_write(path, lambda file: torch.save(tensors, file))


def sorted_header(payload: bytes) -> bytes:
    """A safetensors file's bytes with its JSON header's keys sorted, the same length: safetensors
    writes metadata from a hash map, in an order that differs between processes, and a resumed
    run must rewrite a file byte for byte (the data offsets do not depend on the order)."""
    n = int.from_bytes(payload[:8], "little")
    header = json.dumps(json.loads(payload[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    if len(header.encode()) > n:  # not expected: the same JSON, compact, ASCII
        return payload
    return payload[:8] + header.encode().ljust(n) + payload[8 + n :]


def load_exported_backbone(path: str | Path) -> dict[str, Tensor]:
    """Read weights written by :func:`export_backbone` (either format) onto the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        _require_file(path)
        safetensors_torch = _import_safetensors()
        try:
            tensors: dict[str, Tensor] = safetensors_torch.load_file(str(path), device="cpu")
        except Exception as error:
            raise ValueError(f"cannot read safetensors file {path}: {error}") from error
        return tensors
    state = _weights_only_load(path, "cpu")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not an exported backbone (a dict of tensors)")
    return state


def _weights_only_load(path: Path, map_location: str | torch.device) -> Any:
    _require_file(path)
    _require_safe_torch()
    try:
        # weights_only=True always: the unpickler rebuilds tensors and plain containers only
        # and refuses anything else, so a malicious file cannot run code. No fallback.
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        if "weights_only" in reason or "Weights only" in reason:
            # torch's text advises weights_only=False, which would run the file's code: never
            reason = "it holds objects the safe (weights_only) loader refuses"
        raise ValueError(
            f"cannot read checkpoint {path}: {reason}. The file may be truncated by an "
            "interrupted write, corrupt, or a pickle holding objects other than tensors and "
            "plain values (it was not executed)"
        ) from error


def _require_safe_torch() -> None:
    # TorchVersion compares as a version (2.14 > 2.6), not as the string it is
    version = torch.torch_version.TorchVersion(torch.__version__)
    if version < _MIN_SAFE_TORCH:
        raise RuntimeError(
            f"torch {version} can be made to run code from a checkpoint despite "
            "weights_only=True (CVE-2025-32434); upgrade to torch >= 2.6 to load checkpoints"
        )


def _require_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if not path.is_file():
        raise ValueError(
            f"{path} is not a file; pass the checkpoint file, e.g. {path / LATEST_NAME}"
        )


def _import_safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "writing or reading .safetensors needs the safetensors package: "
            "pip install safetensors, or use a .pt path"
        ) from error
    return safetensors.torch


def _listing(label: str, items: list[str], shown: int = 5) -> str:
    if not items:
        return ""
    more = f", … {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} {label} ({', '.join(items[:shown])}{more})"


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Suggest stripping/adding a key prefix (``module.``, ``backbone.``) when that explains all."""
    if not missing or not unexpected:
        return ""
    for have, want, verb in ((unexpected, missing, "strip"), (missing, unexpected, "add")):
        first = want[0]
        for key in have:
            if key.endswith("." + first):
                prefix = key[: -len(first)]
                if {prefix + key_ for key_ in want} <= set(have):
                    return f". Hint: {verb} the prefix {prefix!r} on the file's keys"
    return ""
