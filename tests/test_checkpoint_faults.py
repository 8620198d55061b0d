"""save_pretrained under faults, at world 2 on real gloo groups: a rank killed mid-save, a full
disk, a read-only directory, a call on one rank only, a failure on one rank. Every case must
end in its documented error on every surviving rank within the group timeout + 5 s, and the
checkpoint that was there before must still load, in transformers and in fusedpar, with its
old values. Also: files of an earlier layout never survive a save.

Faults are injected into real runs (tests/faults.py): `os._exit` inside the victim's
`dist.gather` or inside rank 0's safetensors write, `RLIMIT_FSIZE` for a full disk.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import signal
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fusedpar
from tests.faults import MATRIX_CASES, run_scenarios
from tests.layers.test_models import build

TIMEOUT_S = 3.0
BOUND_S = TIMEOUT_S + 5.0
OLD_SEED, NEW_SEED = 21, 22
# The first Llama built in a process imports its modeling code (~5 s here). The fault workers
# import this module before their first group, so paying it now keeps it out of the timings.
build("llama")


def _parallel_model(group):
    from fusedpar.plan import parallelize

    return parallelize(build("llama", seed=NEW_SEED), "auto", group=group, kernel="torch")


# Scenarios: (group, rank, world, **kwargs); raising is the documented outcome of most.
def s_healthy(group, rank, world, *, path):
    fusedpar.save_pretrained(_parallel_model(group), path)  # one file over an old sharded checkpoint


def s_disk_full(group, rank, world, *, path):
    model = _parallel_model(group)
    if rank != 0:
        return fusedpar.save_pretrained(model, path, max_shard_size="300KB")
    # A file may grow to 200 KB, the shards are up to 300 KB: the write raises EFBIG (SIGXFSZ
    # ignored), as a full disk would raise ENOSPC.
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        fusedpar.save_pretrained(model, path, max_shard_size="300KB")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def s_read_only(group, rank, world, *, path):
    fusedpar.save_pretrained(_parallel_model(group), path, max_shard_size="300KB")


def s_one_rank_only(group, rank, world, *, path, caller):
    model = _parallel_model(group)
    if rank == caller:  # the other rank never calls save_pretrained
        fusedpar.save_pretrained(model, path)


def s_error_on_one_rank(group, rank, world, *, path):
    import fusedpar.checkpoint_save as cs

    model = _parallel_model(group)
    if rank == 1:
        real, calls = cs._local, [0]

        def failing(t):
            calls[0] += 1
            if calls[0] == 6:  # in the second file
                raise MemoryError("injected: out of memory reading this rank's shard")
            return real(t)

        cs._local = failing
    fusedpar.save_pretrained(model, path, max_shard_size="300KB")


def s_shard_size_differs(group, rank, world, *, path):
    fusedpar.save_pretrained(_parallel_model(group), path, max_shard_size="300KB" if rank == 0 else "400KB")


def s_killed_in_gather(group, rank, world, *, path):
    model = _parallel_model(group)
    if rank == 1:
        real, calls = dist.gather, [0]

        def gather(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:  # mid-save: some files are written, more to come
                os._exit(3)
            return real(*args, **kwargs)

        dist.gather = gather
    fusedpar.save_pretrained(model, path, max_shard_size="300KB")


def s_killed_writing(group, rank, world, *, path):
    import safetensors.torch

    model = _parallel_model(group)
    if rank == 0:
        real, calls = safetensors.torch.save_file, [0]

        def save_file(tensors, filename, metadata=None):
            calls[0] += 1
            if calls[0] == 2:  # half a file on disk, then the process dies
                with open(filename, "wb") as f:
                    f.write(b"\x00" * 1000)
                os._exit(3)
            return real(tensors, filename, metadata=metadata)

        safetensors.torch.save_file = save_file
    fusedpar.save_pretrained(model, path, max_shard_size="300KB")


SCENARIOS = {
    "healthy": s_healthy,
    "disk_full": s_disk_full,
    "read_only": s_read_only,
    "one_rank_only": s_one_rank_only,
    "error_on_one_rank": s_error_on_one_rank,
    "shard_size_differs": s_shard_size_differs,
    "killed_in_gather": s_killed_in_gather,
    "killed_writing": s_killed_writing,
}


# ---------------------------------------------------------------------------------------------
# The parent's checks
# ---------------------------------------------------------------------------------------------


def _old_checkpoint(path: Path) -> None:
    build("llama", seed=OLD_SEED).save_pretrained(path, max_shard_size="200KB")  # 8 files and an index


def _assert_holds(path: Path, seed: int, label: str) -> None:
    """`path` is a complete checkpoint of the model built from `seed`, read by both loaders,
    with no staging directory left next to it."""
    from transformers import LlamaForCausalLM

    want = build("llama", seed=seed).state_dict()
    got = LlamaForCausalLM.from_pretrained(path).state_dict()
    with torch.device("meta"):
        ours = LlamaForCausalLM(build("llama").config)
    fusedpar.load_checkpoint(ours, path)
    for k, v in want.items():
        assert torch.equal(got[k], v), f"{label}: transformers loads a different {k} from {path}"
        assert torch.equal(ours.state_dict()[k], v), f"{label}: fusedpar loads a different {k} from {path}"
    left = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.fusedpar-")]
    assert not left, f"{label}: staging left behind next to {path}: {left}"


def _expect(outcomes, name, rank, error_type, *patterns):
    got = outcomes[name]
    assert rank in got, f"{name}: rank {rank} reported nothing (hung or died)"
    o = got[rank]
    if error_type is None:
        assert o.ok, f"{name}: rank {rank} expected success, got {o.error_type}: {o.message}"
    else:
        assert not o.ok and o.error_type == error_type, (
            f"{name}: rank {rank} expected {error_type}, got {'success' if o.ok else o.error_type + ': ' + o.message}")
        for p in patterns:
            assert p in o.message, f"{name}: rank {rank}: {p!r} not in {o.message!r}"
    assert o.elapsed <= BOUND_S, f"{name}: rank {rank} took {o.elapsed:.1f} s > {BOUND_S:.1f} s"


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


@contextlib.contextmanager
def _read_only(directory: Path):
    """No entry can be made in `directory`: chmod for a normal user; root ignores modes, so
    there the immutable flag (chattr +i), where the file system and capabilities allow."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        try:
            yield True
        finally:
            os.chmod(directory, 0o755)
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags | FS_IMMUTABLE_FL))
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags))
    finally:
        os.close(fd)


def test_failed_saves_leave_the_old_checkpoint_and_fail_on_every_rank(tmp_path):
    paths = {}
    for name in ("healthy", "disk_full", "read_only", "rank0_only", "rank1_only", "error_on_one_rank",
                 "shard_size_differs", "killed_in_gather"):
        paths[name] = tmp_path / name / "ckpt"  # own parent each: the staging directory is a sibling
        _old_checkpoint(paths[name])
    plan = [("healthy", {"path": str(paths["healthy"])}),
            ("disk_full", {"path": str(paths["disk_full"])}),
            ("read_only", {"path": str(paths["read_only"])}),
            ("one_rank_only", {"path": str(paths["rank0_only"]), "caller": 0}),
            ("one_rank_only", {"path": str(paths["rank1_only"]), "caller": 1}),
            ("error_on_one_rank", {"path": str(paths["error_on_one_rank"])}),
            ("shard_size_differs", {"path": str(paths["shard_size_differs"])}),
            ("killed_in_gather", {"path": str(paths["killed_in_gather"])})]
    with _read_only(paths["read_only"].parent) as read_only:
        if not read_only:
            plan = [p for p in plan if p[0] != "read_only"]
        # one_rank_only runs twice: its outcomes are keyed by name, so run the second apart
        first = [p for p in plan if not (p[0] == "one_rank_only" and p[1]["caller"] == 1)]
        outcomes, codes = run_scenarios(2, __name__, first, timeout_s=TIMEOUT_S)
    unchanged = "is unchanged"
    _expect(outcomes, "healthy", 0, None)
    _expect(outcomes, "healthy", 1, None)
    for r in (0, 1):
        _expect(outcomes, "disk_full", r, "SaveError", "save_pretrained: rank 0 of 2 failed while writing model-0",
                "File too large", unchanged)
        if read_only:
            _expect(outcomes, "read_only", r, "SaveError", "save_pretrained: rank 0 of 2 failed while preparing",
                    "Error", unchanged)
        _expect(outcomes, "error_on_one_rank", r, "SaveError", "save_pretrained: rank 1 of 2 failed while writing",
                "MemoryError: injected", unchanged)
        _expect(outcomes, "shard_size_differs", r, "SaveError", "rank 1 of 2 would save", "max_shard_size",
                unchanged)
    _expect(outcomes, "one_rank_only", 0, "SaveError", "rank(s) [1] did not enter save_pretrained", "collective")
    _expect(outcomes, "one_rank_only", 1, None)
    _expect(outcomes, "killed_in_gather", 0, "SaveError", "save_pretrained: rank 0 of 2 lost contact", unchanged)
    assert 1 not in outcomes["killed_in_gather"], "the victim should have died mid-save"
    assert codes == [0, 3], f"exit codes {codes}: rank 0 must exit cleanly, rank 1 by os._exit(3)"

    # a later group; rank 0 is killed half-way through writing a shard (it must come last)
    plan2 = [("one_rank_only", {"path": str(paths["rank1_only"]), "caller": 1}),
             ("killed_writing", {"path": str(tmp_path / "killed_writing" / "ckpt")})]
    _old_checkpoint(tmp_path / "killed_writing" / "ckpt")
    outcomes2, codes2 = run_scenarios(2, __name__, plan2, timeout_s=TIMEOUT_S)
    _expect(outcomes2, "one_rank_only", 1, "SaveError", "rank 0 did not enter save_pretrained", "collective")
    _expect(outcomes2, "one_rank_only", 0, None)
    _expect(outcomes2, "killed_writing", 1, "SaveError", "save_pretrained: rank 1 of 2 lost contact",
            "while voting on writing model-0000", unchanged)
    assert codes2 == [3, 0], f"exit codes {codes2}"

    _assert_holds(paths["healthy"], NEW_SEED, "healthy")
    assert not (paths["healthy"] / "model.safetensors.index.json").exists(), "the old index survived"
    for name, path in paths.items():
        if name != "healthy":
            _assert_holds(path, OLD_SEED, name)
    # rank 0 died mid-write: its staging directory is left, the old checkpoint intact; the
    # next save (here in one process) clears it
    killed = tmp_path / "killed_writing" / "ckpt"
    left = [p.name for p in killed.parent.iterdir() if p.name != "ckpt"]
    assert len(left) == 1 and ".ckpt.fusedpar-tmp-" in left[0], left
    with pytest.raises(AssertionError, match="staging left behind"):
        _assert_holds(killed, OLD_SEED, "killed_writing")
    fusedpar.save_pretrained(build("llama", seed=NEW_SEED), killed, max_shard_size="300KB")
    _assert_holds(killed, NEW_SEED, "save after killed_writing")

    MATRIX_CASES.extend(f"save_pretrained[world=2] x {name}" for name, _ in first + plan2)


# ---------------------------------------------------------------------------------------------
# Files of an earlier layout never win
# ---------------------------------------------------------------------------------------------


def _run_layout_changes(group, path: str):
    from transformers import LlamaForCausalLM

    from fusedpar.plan import parallelize

    rank = dist.get_rank(group)
    out = Path(path)
    problems = []  # asserted at the end, so no rank leaves the other waiting in a collective
    for seed, size, single in ((31, "200KB", False), (32, "5GB", True), (33, "300KB", False), (34, "5G", True)):
        model = parallelize(build("llama", seed=seed), "auto", group=group, kernel="torch")
        if seed == 33 and rank == 0:
            (out / "tokenizer.json").write_text('{"kept": true}')  # not a weight file: survives
        fusedpar.save_pretrained(model, out, max_shard_size=size)
        if rank == 0:
            names = sorted(os.listdir(out))
            layout = ("model.safetensors.index.json" in names, "model.safetensors" in names)
            if layout != (not single, single) or (not single and sum(n.startswith("model-") for n in names) < 3):
                problems.append(f"seed {seed}, max_shard_size={size}: {names}")
            want = build("llama", seed=seed).state_dict()
            got = LlamaForCausalLM.from_pretrained(out).state_dict()
            problems += [f"transformers read a stale {k} after saving with {size}"
                         for k, v in want.items() if not torch.equal(got[k], v)]
        dist.barrier(group=group)
        with torch.device("meta"):
            fresh = LlamaForCausalLM(build("llama").config)
        fresh = parallelize(fresh, "auto", group=group, kernel="torch")
        fusedpar.load_checkpoint(fresh, out)
        ref = parallelize(build("llama", seed=seed), "auto", group=group, kernel="torch")
        problems += [f"rank {rank}: fusedpar read a stale {k} after saving with {size}"
                     for (k, a), (_, b) in zip(fresh.state_dict().items(), ref.state_dict().items())
                     if not torch.equal(a, b)]
    if rank == 0 and (out / "tokenizer.json").read_text() != '{"kept": true}':
        problems.append("tokenizer.json was not kept")
    assert not problems, "\n".join(problems)
    return True


def test_files_of_an_earlier_layout_never_survive_a_save(dist2, tmp_path):
    # sharded -> single -> sharded with another count -> single, over a Hugging Face original
    build("llama", seed=30).save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    assert dist2.run(_run_layout_changes, str(tmp_path / "ckpt")) == [True, True]


def test_an_interrupted_fallback_swap_is_named_then_restored(tmp_path):
    # Where renameat2 cannot swap, the old directory is renamed aside, then the new one in;
    # a crash between the two leaves only the old one, aside. Loading names it; saving restores it.
    path = tmp_path / "ckpt"
    _old_checkpoint(path)
    (path / "notes.txt").write_text("kept")
    aside = tmp_path / ".ckpt.fusedpar-old-0123456789ab"
    path.rename(aside)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(build("llama").config)
    with pytest.raises(FileNotFoundError, match="interrupted mid-swap left the previous checkpoint at .*fusedpar-old"):
        fusedpar.load_checkpoint(model, path)
    with pytest.raises(ValueError, match="max_shard_size"):  # an argument error touches nothing
        fusedpar.save_pretrained(build("llama", seed=NEW_SEED), path, max_shard_size="5XB")
    assert aside.exists() and not path.exists()
    fusedpar.save_pretrained(build("llama", seed=NEW_SEED), path)
    assert not aside.exists()
    assert (path / "notes.txt").read_text() == "kept", "the old directory was not restored before the save"
    _assert_holds(path, NEW_SEED, "after the restore and a save")
