"""The saved state of a ``fastmask debias`` run, ``OUT/checkpoint/state.pt``: everything ``--resume`` needs to end
exactly as an uninterrupted run would.

One file, written atomically after the masks are ready and after every epoch, read with
``torch.load(weights_only=True)`` (plain data and tensors only, no pickled objects): the model's weights, the
method's :class:`~fastmask.methods.state.RunState` in its ``to_state`` form, the loaders' positions, the per-epoch
evaluations so far, and ``spec``, what the run depends on (method, configuration, data options, the digests of the
weights file and of the shard indexes); a resumed run must have the same spec.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastmask.data.shards import ShardIndex
from fastmask.util.files import atomic_write_bytes

#: Where the run state lives inside the output directory.
CHECKPOINT = "checkpoint/state.pt"
FORMAT = "fastmask.debias-state"
VERSION = 2


@dataclass
class SavedRun:
    """The content of the run-state file.

    Attributes:
        spec: what the run depends on (JSON-able; compared on ``--resume``).
        model: the model's ``state_dict()`` on the CPU.
        run: :meth:`fastmask.methods.state.RunState.to_state` of the step in progress.
        loaders: the mask and train loaders' epoch counters.
        before: the evaluation set's scores before debiasing.
        epochs: the per-epoch evaluations so far.
        loader_log: the loaders' statistics of every finished pass.
        seconds: run time so far, over every invocation.
    """

    spec: dict[str, Any]
    model: dict[str, Tensor]
    run: dict[str, Any]
    loaders: dict[str, int]
    before: dict[str, Any]
    epochs: list[dict[str, Any]]
    loader_log: list[dict[str, Any]]
    seconds: float

    def save(self, path: str | os.PathLike) -> None:
        """Write the state atomically (a reader sees the old state or the new one, never half of one)."""
        payload = {"format": FORMAT, "version": VERSION, **asdict(self), "spec": json.dumps(self.spec)}
        payload["model"] = self.model  # asdict would deep-copy the tensors
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SavedRun:
        """Read a state written by :meth:`save`; a damaged or foreign file is an error that names it."""
        path = Path(path)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types on a damaged file
            raise ValueError(f"run state {path} cannot be read ({type(err).__name__}: {err}); delete {path.parent} "
                             "to start over") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("version") != VERSION:
            raise ValueError(f"{path} is not a fastmask debias run state (version {VERSION}); delete {path.parent} "
                             "to start over")
        return cls(**{f.name: saved[f.name] for f in fields(cls)} | {"spec": json.loads(saved["spec"])})

    def check_same_run(self, spec: Mapping[str, Any], path: str | os.PathLike) -> None:
        """Raise, listing the differences, unless ``spec`` equals the saved run's."""
        old, new = _flatten(self.spec), _flatten(spec)
        diffs = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        if diffs:
            raise ValueError(f"--resume: {path} belongs to a run with other inputs or options "
                             f"({'; '.join(diffs[:8])}); rerun with the same ones, or delete {Path(path).parent} to "
                             "start over")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (the weights a run started from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_digest(index: ShardIndex) -> str:
    """The SHA-256 of a shard index's content: the shards may move between invocations, their content may not."""
    return hashlib.sha256(json.dumps(index.to_json(), sort_keys=True).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}
