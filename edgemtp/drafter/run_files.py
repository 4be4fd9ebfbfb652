"""The files of a drafter's training run in its output directory: the checkpoint --resume continues (and
the checks that it is this run's), train.log, and the finished drafter moved in whole (config.json last).

The finished drafter replaces what the directory held only once it is whole: a run refused or killed
before its end leaves the directory's earlier drafter as it was, never a mix of the two; an earlier run's
head tables or fingerprint that this run did not make are removed then, and a fresh run starts its own
train.log. The caches (cache/) stay: they are keyed on their input."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import ArgumentError, SwitchError
from . import model as M

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

Progress = Callable[[int, int, dict], None]

STAGING = ".final"  # inside the output directory: the finished drafter's files before they are moved in
# what differs between a checkpoint's run and this one, in words right from Python and the CLI alike
RUN_PARTS = {"seed": "seed", "data": "data (windows, their length, greedy continuations)",
             "spec": "training options (batch, learning rate, draft steps, accept weight)",
             "drafter": "drafter shape (width, layers, MLP units, starting drafter)"}


def fresh_staging(out_dir: Path) -> Path:
    """An empty directory in `out_dir` for the finished drafter's files (publish() moves them in)."""
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    return staging


@contextlib.contextmanager
def only_run(out_dir: Path):
    """Held while a run writes `out_dir` (an advisory lock, which the kernel drops when the process dies): a
    second run given the same -o is refused. Each writes the directory's checkpoint, log and staging
    directory by fixed names, so that two at once mixed one's drafter with the other's. Without flock
    (Windows, a file system without it) the run goes on unguarded."""
    fd = None
    if fcntl is not None:
        fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArgumentError("out_dir", os.fspath(out_dir), "is being written by another drafter training run "
                                "(wait for it to end, or give another directory)", "-o") from None
        except OSError:
            os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the lock


def run_record(seed: int, data, spec, cfg) -> str:
    """What makes a checkpoint this run's: the options its weights follow from (not the held-out windows,
    nor how often it evaluates or checkpoints, which --resume may change)."""
    data = dataclasses.asdict(data) if dataclasses.is_dataclass(data) else "arrays"
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in ("heldout", "seed")}  # the seed is its own entry
    spec = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("eval_every", "ckpt_every")}
    return json.dumps({"seed": seed, "data": data, "spec": spec, "drafter": cfg.to_json()}, sort_keys=True)


def publish(staging: Path, out_dir: Path) -> None:
    """The finished drafter's files into `out_dir`, config.json last (what makes it a drafter directory);
    an earlier run's head tables go when this run made none (the weights and fingerprint it always makes)."""
    from .export import HEAD_FILE

    (out_dir / "config.json").unlink(missing_ok=True)
    if not (staging / HEAD_FILE).exists():
        (out_dir / HEAD_FILE).unlink(missing_ok=True)
    for f in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):
        f.replace(out_dir / f.name)
    staging.rmdir()


def check_output(out_dir: Path) -> None:
    """`out_dir` is new, or a drafter's (an earlier run's, --init's fine-tuned in place): the finished drafter
    replaces its config.json and model.safetensors, which in a model directory (-o given the target's own by
    mistake) are the model's weights, and would add a drafter and its caches among a bundle's files. The refusal
    names train_drafter's out_dir from Python, -o from the CLI (ArgumentError)."""
    from . import MODEL_TYPE, model_type_in

    given = os.fspath(out_dir)  # the path as text: a pathlib.Path's repr named the class
    if (out_dir / "edgemtp.json").is_file():
        raise ArgumentError("out_dir", given, "is an edgemtp bundle, not a drafter directory (give the drafter a "
                            "directory of its own, then export the bundle with it as its drafter)", "-o")
    config = out_dir / "config.json"
    if not config.is_file():
        return
    if (kind := model_type_in(config)) != MODEL_TYPE:
        raise ArgumentError("out_dir", given, f"holds a model ({config}: model_type {kind!r}), not a drafter: "
                            "training would replace its config.json and model.safetensors (give the drafter a "
                            "directory of its own)", "-o")


def resume_state(ckpt: Path, run: str, cfg, steps: int) -> dict:
    """The checkpoint --resume continues, checked before the target pass (minutes): there, readable, of
    this drafter's shape, and written by a run with the same options (with other data or seed it would not
    be that run continued; more steps extend it). The refusals name resume=True and steps= from Python, --resume
    and --steps from the CLI (SwitchError, ArgumentError)."""
    if not ckpt.is_file():
        raise SwitchError("resume", True, f"needs a checkpoint to continue, and there is none at {ckpt}")
    try:
        state = torch.load(ckpt, weights_only=True)
        earlier = state.get("run")
        with torch.random.fork_rng():  # a trial load; the run's random numbers stay as they were
            M.MTPDrafter(cfg).load_state_dict(state["model"])
    except Exception as e:  # damaged (torch's own errors), or weights of another shape (RuntimeError)
        raise SwitchError("resume", True, f"needs a checkpoint of this drafter, and {ckpt} is not one "
                          f"({str(e).strip().splitlines()[0][:160]})") from None
    if earlier is not None and earlier != run:
        old, new = json.loads(earlier), json.loads(run)
        what = next((RUN_PARTS[k] for k in RUN_PARTS if old.get(k) != new.get(k)), "options")
        raise SwitchError("resume", True, f"continues the run that wrote {ckpt}, and it had other {what}: resume "
                          "with that run's options, or train afresh")
    if int(state["step"]) > steps:
        raise ArgumentError("steps", steps, f"is fewer than the steps {ckpt} has done already "
                            f"({int(state['step'])})")
    return state


def complete(out_dir: Path, target_dir: Path, init: Path | None) -> None:
    """What makes `out_dir` a drafter directory by itself: the target's fingerprint (how `edgemtp export`
    recognises the target) and, after --init, that drafter's clustered-head tables (same vocabulary and
    hidden size, checked at export) unless some were fitted or written here already."""
    from . import write_fingerprint
    from .export import HEAD_FILE

    write_fingerprint(out_dir, target_dir)
    if init is not None and (Path(init) / HEAD_FILE).is_file() and not (out_dir / HEAD_FILE).exists():
        shutil.copy2(Path(init) / HEAD_FILE, out_dir / HEAD_FILE)


def save_checkpoint(model, opt, step: int, train_s: float, path: Path, run: str) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            writes = _Writes(f)
            try:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "train_s": train_s,
                            "run": run}, writes)
            except RuntimeError:
                if writes.error is None:
                    raise
                raise writes.error from None
        tmp.replace(path)
    except BaseException:  # a full disk, Ctrl-C: its half-written bytes (the weights and the optimizer's) go
        tmp.unlink(missing_ok=True)
        raise


class _Writes:
    """A file torch.save writes through, keeping the OSError of a failed write: torch turns it into its own
    `RuntimeError: [enforce fail at inline_container.cc] . unexpected pos 64 vs 0`, which says nothing of a full
    disk (the CLI names its -o for an OSError of a full disk)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # flush, and whatever else torch asks of a file
        return getattr(self.f, name)


class Log:
    """train.log, JSON lines: a fresh run's own. A resumed run keeps the records up to its checkpoint's step
    `start`: the interrupted run's later ones are redone."""

    def __init__(self, path: Path, progress: Progress | None, steps: int, start: int = 0, resume: bool = False):
        self.path, self.progress, self.steps = path, progress, steps
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if resume and path.is_file() else []
        path.write_text("".join(line for line in lines if _step(line) <= start), encoding="utf-8")

    def write(self, step: int, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 1), **record}) + "\n")
        if self.progress:
            self.progress(step, self.steps, record)


def _step(line: str) -> float:
    """A train.log record's step; a line torn by the kill counts as past every checkpoint (dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
