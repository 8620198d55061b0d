"""Atomic checkpoint writes for `save_pretrained`: stage, vote, swap.

A save never writes into the checkpoint directory itself. Rank 0 writes a complete new
directory next to it (`.<name>.fusedpar-tmp-<id>`), every rank votes after each file (and
once more after the index and configs), and only when every rank voted "complete" is the new
directory swapped in by one rename (`renameat2(RENAME_EXCHANGE)` on Linux; elsewhere two
renames, recovered by the next save if a crash falls between them). So a crash, a killed rank
or a full disk at any moment leaves the old checkpoint intact or the new one complete, never a
mix, and weight files of an earlier layout (a stale index next to a single file, or back)
never survive: the new directory holds only what this save wrote, plus the old directory's
other files (tokenizer, README, ...) hard-linked over.

Failures travel with the votes: a rank that fails keeps taking part in the collectives up to
the next vote (sending zeros), so its peers are never left waiting, and then every rank
raises the same `SaveError` naming the rank and the cause. A peer that dies shows up in the
next collective within ~0.2 s on gloo. Before anything moves, every rank checks in through
the group's store with a short deadline, so a `save_pretrained` called on some ranks only
fails there with a message naming it instead of waiting out the group timeout.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SaveError", "parse_size", "group_timeout_s", "join", "Votes", "StagedDir", "WEIGHT_FILE"]

# Weight files Hugging Face loaders pick up: never carried over from the directory a save replaces.
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_TMP, _OLD = "fusedpar-tmp-", "fusedpar-old-"
JOIN_TIMEOUT_S = 60.0  # at most this long for every rank to enter save_pretrained (less if the group's is shorter)


class SaveError(RuntimeError):
    """`save_pretrained` failed on some rank; raised on every rank that could be told. The
    directory holds the previous checkpoint unchanged unless the message says otherwise."""


# --------------------------------------------------------------------------------------------
# max_shard_size
# --------------------------------------------------------------------------------------------

_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3,
          "G": 10**9, "M": 10**6, "K": 10**3}


def parse_size(size: int | str, *, arg: str = "max_shard_size") -> int:
    """Bytes in `size`: an int, or what transformers' `convert_file_size_to_int` takes
    ("5GB", "500MB", "5KB" 1000-based, "5GiB" 1024-based, a lowercase "b" meaning bits as
    there), and also "5G" / "5M" / "5K" (1000-based), decimals ("1.5GB") and plain digits."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"{arg}: expected an int (bytes) or a str such as '5GB', got {type(size).__name__}")
    if isinstance(size, int):
        value = size
    else:
        s = size.strip()
        m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([A-Za-z]*)", s)
        unit = m.group(2).upper() if m else None
        if m is None or (unit and unit not in _UNITS):
            raise ValueError(f"{arg}: expected an int (bytes) or a number with a unit (KB/MB/GB or K/M/G: 1000-based; "
                             f"KiB/MiB/GiB: 1024-based), e.g. '5GB', '5G', '500MB', '5GiB', got {size!r}")
        value = int(float(m.group(1)) * _UNITS[unit]) if unit else int(float(m.group(1)))
        if unit in ("GB", "MB", "KB") and m.group(2).endswith("b"):
            value //= 8  # transformers reads "5Gb" / "5gb" as gigabits
    if value <= 0:
        raise ValueError(f"{arg}: expected a positive size, got {size!r}")
    return value


# --------------------------------------------------------------------------------------------
# Agreement across ranks
# --------------------------------------------------------------------------------------------


def group_timeout_s(group: dist.ProcessGroup) -> float:
    """The group's collective timeout in seconds (what a stalled peer costs)."""
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout.total_seconds()
        except Exception:  # noqa: BLE001 - no backend for this device, or an older torch
            continue
    from .comm import DEFAULT_TIMEOUT

    return DEFAULT_TIMEOUT.total_seconds()


def _store(group: dist.ProcessGroup) -> Any:
    """The group's own key-value store (a PrefixStore), or None where torch hides it."""
    try:
        return dist.distributed_c10d._world.pg_map[group][1]
    except Exception:  # noqa: BLE001 - private API: without it the first vote does the job, at the group timeout
        return None


_JOINED: set[str] = set()  # calls this process joined: a late rank must not join an old one again


def join(group: dist.ProcessGroup, where: str, timeout_s: float, path: Path) -> None:
    """Every rank of `group` has entered `where` within `timeout_s`, or SaveError on each
    rank that waited, naming the ranks that did not come. Rank 0 opens the call (a fresh id
    in the store), the others check in under that id, and rank 0 answers go or no-go, so a
    rank that arrives just as rank 0 gives up learns it too."""
    store = _store(group)
    if store is None:
        return
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    base = f"fusedpar/{where}"
    deadline = time.monotonic() + timeout_s
    unchanged = f"nothing was written to {path}"

    def wait(cond: Any) -> bool:
        while not cond():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    try:
        if rank == 0:
            call = uuid.uuid4().hex
            store.set(f"{base}/open", call)
            keys = {r: f"{base}/{call}/in/{r}" for r in range(1, world)}
            ok = wait(lambda: store.check(list(keys.values())))
            missing = [r for r, k in keys.items() if not store.check([k])]
            store.set(f"{base}/{call}/go", "go" if not missing else "no")
            store.set(f"{base}/open", "closed")  # a rank arriving later must not join this call
            if not ok and missing:
                raise SaveError(f"{where}: rank 0 of {world}: rank(s) {missing} did not enter {where} within "
                                f"{timeout_s:.1f} s. It is a collective: every rank of the group must call it; "
                                f"{unchanged}")
            return
        call = ""

        def opened() -> bool:
            nonlocal call
            if not store.check([f"{base}/open"]):
                return False
            call = store.get(f"{base}/open").decode()
            return call != "closed" and call not in _JOINED

        if not wait(opened):
            raise SaveError(f"{where}: rank {rank} of {world}: rank 0 did not enter {where} within {timeout_s:.1f} s. "
                            f"It is a collective: every rank of the group must call it; {unchanged}")
        _JOINED.add(call)
        store.set(f"{base}/{call}/in/{rank}", "1")
        if not wait(lambda: store.check([f"{base}/{call}/go"])) or store.get(f"{base}/{call}/go") != b"go":
            raise SaveError(f"{where}: rank {rank} of {world}: rank 0 gave up waiting for the other ranks to enter "
                            f"{where} (or died); {unchanged}")
    except SaveError:
        raise
    except Exception as e:  # the store lives on a rank that died (TCPStore), or went away
        raise SaveError(f"{where}: rank {rank} of {world}: the group's store failed while the ranks checked in "
                        f"({type(e).__name__}: {e}); a rank probably died; {unchanged}") from e


class Votes:
    """Rounds in which every rank reports its first failure (or None); any failure, or a
    peer lost during the round, raises the same SaveError on every rank."""

    def __init__(self, group: dist.ProcessGroup | None, where: str, path: Path) -> None:
        self.group, self.where, self.path = group, where, path
        self.rank, self.world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
        self.swapping = False  # from the last round on, what a failure leaves behind is less certain
        self.committed = False  # once the new directory is in place, failures say so

    def outcome(self) -> str:
        if self.committed:
            return f"the new checkpoint at {self.path} is complete (it was swapped in before the failure)"
        if self.swapping:
            return f"{self.path} holds the old checkpoint or the new one, complete (the failure came at the swap)"
        return f"the checkpoint at {self.path} is unchanged"

    def lost(self, what: str, error: BaseException) -> SaveError:
        """The error for a collective that failed: the group cannot be used any more."""
        others = [r for r in range(self.world) if r != self.rank]
        return SaveError(f"{self.where}: rank {self.rank} of {self.world} lost contact with rank(s) {others} while "
                         f"{what}: a rank crashed or stalled past the group timeout; {self.outcome()}. "
                         f"Backend said: {error}")

    def round(self, what: str, error: str | None, payload: Any = None) -> list[Any]:
        """Every rank's `payload`, once every rank reported no error for step `what`."""
        if self.group is None:
            reports = [(error, payload)]
        else:
            reports = [None] * self.world
            try:
                dist.all_gather_object(reports, (error, payload), group=self.group)
            except RuntimeError as e:
                raise self.lost(f"voting on {what}", e) from e
        failed = [(r, err) for r, (err, _) in enumerate(reports) if err]
        if failed:
            causes = "; ".join(f"rank {r} of {self.world} failed while {what}: {err}" for r, err in failed)
            raise SaveError(f"{self.where}: {causes}; {self.outcome()}")
        return [p for _, p in reports]


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------
# The staged directory (rank 0 only)
# --------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where
    the system or the file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here, use two renames
        return False
    raise OSError(err, f"swapping {a} and {b}: {os.strerror(err)}")


class StagedDir:
    """A new checkpoint directory written next to `path` and swapped in by rename."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve() if path.is_symlink() else path.absolute()
        self.tmp = self.path.parent / f".{self.path.name}.{_TMP}{uuid.uuid4().hex[:12]}"

    def _siblings(self, kind: str) -> list[Path]:
        prefix = f".{self.path.name}.{kind}"
        return [p for p in self.path.parent.iterdir() if p.name.startswith(prefix)] if self.path.parent.exists() else []

    def prepare(self) -> None:
        """Recover a swap a crash interrupted, drop what earlier crashed saves left, make
        the staging directory."""
        old = self._siblings(_OLD)
        if not self.path.exists() and len(old) == 1:  # crashed between the two renames
            os.rename(old[0], self.path)
            old = []
        for p in self._siblings(_TMP) + old:
            shutil.rmtree(p)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"{self.path} exists and is not a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()

    def carry_over(self) -> None:
        """Hard-link the old directory's other files (tokenizer, README, ...) into the new
        one; weight files and anything this save wrote stay out."""
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            dst = self.tmp / entry.name
            if WEIGHT_FILE.match(entry.name) or dst.exists():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, dst)

    def seal(self) -> None:
        """Every file and the directory itself on disk, so a power loss after the swap
        cannot leave the new names pointing at missing data."""
        for root, _, names in os.walk(self.tmp):
            for name in names:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync(Path(root) / name)
        _fsync(self.tmp)

    def commit(self) -> None:
        """Swap the staged directory in; the old one is removed after."""
        cwd_inside = _is_cwd(self.path)
        if not self.path.exists():
            os.rename(self.tmp, self.path)
        elif _exchange(self.tmp, self.path):
            shutil.rmtree(self.tmp, ignore_errors=True)  # now the old checkpoint
        else:  # two renames; `prepare` of the next save restores the old one if we die in between
            old = self.path.parent / f".{self.path.name}.{_OLD}{uuid.uuid4().hex[:12]}"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync(self.path.parent)
        if cwd_inside:  # the process sat in the replaced directory: follow the name
            os.chdir(self.path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


def _is_cwd(path: Path) -> bool:
    try:
        return Path.cwd().resolve() == path.resolve()
    except OSError:
        return False


def interrupted_swap_hint(path: Path) -> str:
    """For a missing checkpoint directory: where a crash mid-swap left the previous one."""
    parent = path.absolute().parent
    if not parent.is_dir():
        return ""
    old = [p for p in parent.iterdir() if p.name.startswith(f".{path.name}.{_OLD}")]
    return (f"; a save_pretrained interrupted mid-swap left the previous checkpoint at {old[0]} "
            f"(the next save_pretrained to {path} restores it, or rename it back)") if old else ""
