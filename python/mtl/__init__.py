"""mtl: fine-tune one pretrained language model on many NLP tasks at once, then use every task from that one
model.

    import mtl
    run = mtl.train("examples/atis/config.toml", out="runs/atis", overrides={"training.epochs": 3})
    run = mtl.Run.open("runs/atis")
    run.predict(["show me flights from boston to denver"])   # list of dicts, `mtl predict`'s schema
    run.evaluate("test")                                      # {"intent": {"accuracy": ...}, ...}

A config is a TOML file (see the README and docs/) or the same structure as a dict. Calls run in the Rust
library with the GIL released; progress is shown with tqdm where it is installed (`pip install mtl[progress]`),
and log records go to the `logging` logger ``mtl`` (their level is set by the environment variable ``MTL_LOG``,
``info`` by default). Ctrl-C during `train` finishes the current step and writes a checkpoint, then raises
`KeyboardInterrupt` (a second Ctrl-C raises it at once); `train(..., resume=True)` continues from it. Calls
from several threads run one after the other. Errors are `MtlError` (or `ConfigError`,
`DataError`, `UnsupportedError`) with the library's message, which names the file, line and field.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

# candle's worker threads spin this many times before they sleep (the binary's setting: measured faster on small
# machines, see crates/mtl-train/src/process.rs); set before the native module starts any thread.
os.environ.setdefault("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100")

from . import _native  # noqa: E402
from ._native import ConfigError, DataError, MtlError, UnsupportedError, __version__
from ._progress import Display

__all__ = [
    "train",
    "check",
    "init",
    "Run",
    "MtlError",
    "ConfigError",
    "DataError",
    "UnsupportedError",
    "__version__",
]

#: A config: the path of a TOML file, or the same structure as a dict (its relative paths are read from the
#: current directory).
ConfigLike = Union[str, "os.PathLike[str]", Mapping[str, Any]]
#: One input: a text; a dict as one line of `mtl predict` input (``text`` and a pair task's second field,
#: ``words``, or ``question`` and ``context``); or a list of a sentence's words.
InputLike = Union[str, Sequence[str], Mapping[str, Any]]
#: Overrides: ``{"training.epochs": 3}``, or ``["training.epochs=3"]`` as ``--set`` takes them.
Overrides = Union[Mapping[str, Any], Sequence[str], None]

_log = logging.getLogger("mtl")
if not _log.handlers:
    # Visible in terminals and notebooks without configuring logging; `logging.getLogger("mtl")` changes it.
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("mtl %(levelname)s: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


def _toml_value(value: Any) -> str:
    """A Python value written as a TOML value (for an override)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k), ensure_ascii=False)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"an override value must be a bool, number, string, list or dict, not {type(value).__name__}")


def _flatten(prefix: str, value: Any) -> List[Tuple[str, Any]]:
    """A nested dict of overrides as dotted keys: ``{"training": {"epochs": 3}}`` sets ``training.epochs``
    and leaves the rest of ``[training]`` as the config has it."""
    if isinstance(value, Mapping) and value:
        return [pair for k, v in value.items() for pair in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value)]


def _overrides(overrides: Overrides) -> List[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={_toml_value(value)}" for key, value in _flatten("", overrides)]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def _config(config: ConfigLike) -> Tuple[Optional[str], Optional[str]]:
    """(path, None) for a file, (None, JSON) for a dict."""
    if isinstance(config, Mapping):
        return None, json.dumps(config, default=os.fspath)
    return os.fspath(config), None


def _progress(progress: bool) -> Optional[Display]:
    return Display() if progress else None


def train(
    config: ConfigLike,
    out: Union[str, "os.PathLike[str]"],
    *,
    overrides: Overrides = None,
    tasks: Union[str, Sequence[str], None] = None,
    resume: bool = False,
    baselines: bool = False,
    select: str = "joint",
    accept_changed_data: bool = False,
    progress: bool = True,
) -> "Run":
    """Trains a run from `config` into the directory `out` (`mtl train CONFIG --out OUT`) and returns it
    opened.

    - `overrides`: settings over the config's, ``{"training.epochs": 3}`` or ``{"training": {"epochs": 3}}``
      (``--set``; nested dicts set the keys they name, not whole tables).
    - `tasks`: train only these tasks of the config (``--task``).
    - `resume`: continue the run in `out` from its newest checkpoint (``--resume``); `accept_changed_data`
      allows data files that changed since the run started.
    - `baselines`: also train each task alone with the same recipe (``--baselines``).
    - `select`: ``"joint"`` keeps the best joint checkpoint; ``"per-task"`` each task's own best.
    - `progress`: show a progress bar and the dev evaluations.

    Ctrl-C finishes the current step, writes a checkpoint and raises `KeyboardInterrupt` (its message says
    where the checkpoint is); call again with ``resume=True`` to continue.
    """
    if select not in ("joint", "per-task"):
        raise ValueError(f'select must be "joint" or "per-task", not {select!r}')
    path, text = _config(config)
    _native.train(
        path,
        text,
        os.fspath(out),
        _overrides(overrides),
        [tasks] if isinstance(tasks, str) else list(tasks or []),
        resume,
        accept_changed_data,
        baselines,
        select == "per-task",
        _progress(progress),
    )
    return Run.open(out)


def check(config: ConfigLike, *, overrides: Overrides = None, estimate: bool = True) -> Dict[str, Any]:
    """Reads and encodes the data of `config` as training would, without training (`mtl check --json`): per
    task and split the examples, label counts, rare and unseen labels, inputs cut at ``model.max_len``, and
    with `estimate` the time an epoch takes here (``"estimate"``: timed on a few training steps of a sample)."""
    path, text = _config(config)
    return json.loads(_native.check(path, text, _overrides(overrides), estimate, None))


def init(
    files: Sequence[Union[str, "os.PathLike[str]"]],
    out: Union[str, "os.PathLike[str]"] = "config.toml",
    *,
    model: Optional[Union[str, "os.PathLike[str]"]] = None,
    force: bool = False,
) -> Path:
    """Writes a starter config for the data `files` at `out` (`mtl init`) and returns its path. Splits come from
    the file names (``train``, ``dev``/``valid``, ``test``), formats from the extensions, task kinds from the
    fields; each guess is logged (logger ``mtl``) and written into the config's comments. `model`: the base
    model (the default encoder otherwise). An existing `out` is an error unless `force`."""
    path = Path(out)
    if path.exists() and not force:
        raise MtlError(f"{path}: exists; choose another out or pass force=True")
    text, guesses, tasks = _native.init([os.fspath(f) for f in files], os.fspath(path), None if model is None else os.fspath(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    for guess in guesses:
        _log.info("guessed: %s", guess)
    _log.info("wrote %s with %d task(s): %s", path, len(tasks), ", ".join(tasks))
    return path


class Run:
    """A trained run, opened from its directory: `predict` and `evaluate` work on every backbone."""

    def __init__(self, native: Any) -> None:
        self._native = native
        self._info: Dict[str, Any] = json.loads(native.info())

    @classmethod
    def open(cls, path: Union[str, "os.PathLike[str]"], *, progress: bool = False) -> "Run":
        """Opens the run in the directory `path` (what `mtl train --out` wrote)."""
        return cls(_native.NativeRun.open(os.fspath(path), _progress(progress)))

    @property
    def dir(self) -> Path:
        """The run's directory."""
        return Path(self._native.dir())

    @property
    def manifest(self) -> Dict[str, Any]:
        """What the directory holds: architecture, weights, tasks, base model (``run.json``)."""
        return self._info["manifest"]

    @property
    def capabilities(self) -> Dict[str, Optional[str]]:
        """Each operation (``predict``, ``export``, ...) and why the run cannot do it (``None`` where it can)."""
        return self._info["capabilities"]["operations"]

    @property
    def config(self) -> Dict[str, Any]:
        """The run's resolved config, as a dict."""
        return json.loads(self._native.config_json())

    @property
    def tasks(self) -> List[str]:
        """The run's task names."""
        return sorted(self.config["tasks"])

    @property
    def metrics(self) -> Optional[Dict[str, Any]]:
        """``metrics.json`` of the training that made the run (dev and test scores, best epoch), if there."""
        path = self.dir / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def predict(
        self,
        inputs: Union[InputLike, Sequence[InputLike]],
        *,
        batch_size: int = 64,
        full_precision: bool = False,
        progress: bool = False,
    ) -> Any:
        """Every task's answer for each input, as `mtl predict` prints them: one dict per input with
        ``"input"`` and ``"predictions"`` by task.

        `inputs` is a list of inputs (or one input, which returns one dict): a string, a dict as one line of
        `mtl predict` input (``{"text": ..., "hypothesis": ...}``, ``{"words": [...]}``,
        ``{"question": ..., "context": ...}``), or a list of a sentence's words.
        """
        single = isinstance(inputs, (str, Mapping))
        batch = [inputs] if single else list(inputs)
        records = json.loads(self._native.predict(batch, batch_size, full_precision, _progress(progress)))
        return records[0] if single else records

    def explain(
        self,
        inputs: Union[InputLike, Sequence[InputLike]],
        *,
        tasks: Optional[Sequence[str]] = None,
        steps: int = 50,
        baseline: str = "pad",
        all_words: bool = False,
        progress: bool = False,
    ) -> Any:
        """Why each task answered each input as it did, as `mtl explain` prints it: the prediction record with
        ``"explanations"`` by task, each explained output with its ``score``, ``baseline_score``,
        ``completeness_error``, ``tokens``, ``words`` and ``integrated_gradients`` / ``gradient_x_input`` per
        token and per word. Inputs as `predict` takes them (one input returns one dict)."""
        single = isinstance(inputs, (str, Mapping))
        batch = [inputs] if single else list(inputs)
        native = self._native.explain(batch, list(tasks or []), steps, baseline, all_words, _progress(progress))
        explained = json.loads(native)
        return explained[0] if single else explained

    def evaluate(
        self,
        split: Optional[str] = None,
        *,
        config: Optional[ConfigLike] = None,
        overrides: Overrides = None,
        progress: bool = True,
    ) -> Dict[str, Any]:
        """Scores the run on the dev and test files of `config` (the run's own config unless given), as
        `mtl eval` does: ``{"dev": {TASK: {METRIC: value}}, "test": ...}``, or one split's scores where
        `split` is ``"dev"`` or ``"test"``."""
        if split not in (None, "dev", "test"):
            raise ValueError(f'split must be "dev", "test" or None, not {split!r}')
        path, text = _config(config) if config is not None else (None, None)
        scores = json.loads(self._native.evaluate(path, text, _overrides(overrides), _progress(progress)))
        if split is None:
            return scores
        if split not in scores:
            raise MtlError(f"{self.dir}: the config has no {split} files to score (splits scored: {', '.join(scores)})")
        return scores[split]

    def __repr__(self) -> str:
        m = self.manifest
        return f"Run({str(self.dir)!r}, architecture={m.get('architecture')!r}, tasks={self.tasks!r})"
