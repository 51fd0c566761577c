"""Process-group setup: the same code runs as one plain process or as N processes under torchrun or the
`deepspeed` launcher, on one machine or several. gloo on CPU, NCCL on GPU.

Every collective waits at most `collective_timeout()` seconds (RLHFKIT_DIST_TIMEOUT, default 1800): a rank that
hangs or never joins ends the run with an error instead of a hang. A rank that dies is noticed at once by the
others (its connections close)."""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import RlhfkitError

DEFAULT_TIMEOUT_S = 1800  # torch's own default for gloo; long enough for rank 0 to prepare a large dataset alone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cpu_accelerator_without_gpu() -> None:
    """DeepSpeed picks its accelerator at import; without a GPU say CPU, instead of letting it probe and warn."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed once (a world of one when no launcher set the environment).

    Returns (rank, world_size).
    """
    use_cpu_accelerator_without_gpu()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:  # a plain `python`/`rlhfkit` process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deepspeed

    timeout = collective_timeout()
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout))
    except (dist.DistError, RuntimeError) as e:
        rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise RlhfkitError(
            f"rank {rank} of {world} ({socket.gethostname()}) could not join the process group at {where} "
            f"within {timeout:g} s: {_first_line(e)}\nEvery node must start with the same --nnodes/--master_addr/"
            f"--master_port and reach that address; RLHFKIT_DIST_TIMEOUT sets the wait in seconds.") from None
    return dist.get_rank(), dist.get_world_size()


def collective_timeout() -> float:
    """Seconds a collective (or joining the process group) may wait for the other ranks."""
    raw = os.environ.get("RLHFKIT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise RlhfkitError(f"RLHFKIT_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return seconds


def collective_failure(e: BaseException, stage: str) -> str | None:
    """The message for an exception that means this rank lost the others (a rank died, hung past the timeout or
    never joined), naming this rank, the stage and where in rlhfkit it waited; None for any other exception."""
    text = str(e)
    lost = isinstance(e, dist.DistError) or any(sign in text for sign in (
        "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Socket Timeout",
        "NCCL communicator was aborted", "Watchdog caught collective operation timeout"))
    if not lost or not dist.is_initialized():
        return None
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} ({socket.gethostname()}) lost the other ranks "
            f"during {stage}, at {_rlhfkit_frame(e)}: {_first_line(e)}\n"
            f"Another rank died or waited longer than {collective_timeout():g} s (RLHFKIT_DIST_TIMEOUT); its own "
            f"output says why. Rerun the same command on every node: it resumes from the last complete checkpoint.")


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _rlhfkit_frame(e: BaseException) -> str:
    """The innermost frame of rlhfkit's own code in e's traceback (where this rank was waiting)."""
    package = str(Path(__file__).resolve().parents[1])
    where, tb = "an unknown place", e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.startswith(package):
            where = f"{Path(code.co_filename).relative_to(package)}:{tb.tb_lineno} ({code.co_name})"
        tb = tb.tb_next
    return where


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (metrics), in float64 so counts stay exact."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_min(value: int) -> int:
    """The smallest of one integer over all ranks (so that every rank takes the same decision)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- which ranks share a disk ----------------------------------------------------------------------
# Nodes may or may not share the filesystem that holds the output dir (NFS/Lustre vs local disks, and each
# node may even be given its own output dir). Whatever is written to disk per "disk" (a checkpoint's part, its
# COMPLETE listing) is written by that disk's leader: the lowest rank that sees the same directory.
_disk_leaders: dict[Path, int] = {}


def disk_leader(path: Path) -> int:
    """The lowest rank that sees the same directory as this rank at `path` (its own path for that directory:
    nodes may be given different output dirs). Rank 0 for every rank on a shared filesystem; each node's first
    rank when nodes have local disks. Collective the first time for a path (every rank must call it then),
    answered from memory afterwards, also for paths inside it."""
    path = Path(path).resolve()
    for known in (path, *path.parents):
        if known in _disk_leaders:
            return _disk_leaders[known]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    path.mkdir(parents=True, exist_ok=True)
    # Every rank leaves a token named by a fresh nonce (never looked up before, so no NFS client has a cached
    # "absent" answer for it); after a barrier each rank looks for the tokens of the ranks below it.
    nonce = broadcast_object(secrets.token_hex(8))
    me = rank()
    mine = path / f".rlhfkit-disk-{nonce}-{me}"
    mine.write_text(socket.gethostname())
    barrier()
    leader = next(r for r in range(me + 1) if (path / f".rlhfkit-disk-{nonce}-{r}").exists())
    barrier()
    mine.unlink()
    _disk_leaders[path] = leader
    return leader


def leads_disk(path: Path) -> bool:
    """Whether this rank writes, for every rank that sees the same directory as it, what is written once per disk."""
    return disk_leader(path) == rank()


COPY_CHUNK_BYTES = 64 << 20
VISIBLE_WAIT_S = 90.0  # NFS caches "no such file" for up to acdirmax (60 s by default): look again until then


def copy_dir_to_every_disk(path: Path) -> None:
    """Collective: rank 0's directory `path` (a published model) appears at `path` on every other disk too,
    so that on nodes without a shared filesystem the next stage finds its input on each node. Each other disk's
    leader receives every file over the process group (in 64 MiB pieces) into a temp dir beside `path` and
    renames it into place, so a reader sees no half-written copy. Nothing moves when every rank shares rank 0's
    disk. After each file every rank agrees whether it arrived everywhere: a rank that fails (disk full) makes
    every rank stop with the same error, its temp dir deleted, instead of leaving the others waiting. On return
    `path` is visible to every rank (on NFS after up to VISIBLE_WAIT_S)."""
    from ..paths import make_temp_dir, publish_dir

    path = Path(path)
    receiver = leads_disk(path.parent) and rank() != 0
    if any(all_gather_object(receiver)):
        files = broadcast_object(sorted((str(f.relative_to(path)), f.stat().st_size)
                                        for f in path.rglob("*") if f.is_file()) if is_main() else None)
        copy = _Receiving(path, make_temp_dir) if receiver else None
        for rel, size in files:
            error = _send_file(path / rel, size, copy.open(rel) if copy else None)
            _agree(path, error, copy)
        _agree(path, copy.publish(publish_dir) if copy else None, copy)
    _agree(path, None if wait_until_visible(path) else f"{path} is not there after {VISIBLE_WAIT_S:g} s", None)


class _Receiving:
    """A receiving disk's copy in progress: the temp dir, and the first error writing into it."""

    def __init__(self, path: Path, make_temp_dir):
        self.path, self.tmp, self.error = path, None, None
        try:
            self.tmp = make_temp_dir(path)
        except OSError as e:
            self.error = f"{e.strerror or e} ({path.parent})"

    def open(self, rel: str):
        if self.error:
            return None
        try:
            (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            return open(self.tmp / rel, "wb")
        except OSError as e:
            self.error = f"{e.strerror or e}: {self.tmp / rel}"
            return None

    def publish(self, publish_dir) -> str | None:
        if not self.error:
            try:
                publish_dir(self.tmp, self.path)
            except OSError as e:
                self.error = f"{e.strerror or e}: {self.tmp}"
        return self.error

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _send_file(src_path: Path, size: int, dst) -> str | None:
    """Broadcast one file from rank 0 in pieces (every rank takes part in every piece, so a rank that fails
    keeps in step with the others); returns this rank's error, if any."""
    error = None
    src = None
    if is_main():
        try:
            src = open(src_path, "rb")
        except OSError as e:
            error = f"{e.strerror or e}: {src_path}"
    try:
        for start in range(0, size, COPY_CHUNK_BYTES):
            n = min(COPY_CHUNK_BYTES, size - start)
            piece = torch.zeros(n, dtype=torch.uint8)
            if src is not None and error is None:
                try:
                    data = src.read(n)
                    if len(data) != n:
                        raise OSError(f"{src_path} shrank while it was sent")
                    piece = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                except OSError as e:
                    error = f"{e.strerror or e}: {src_path}"
            piece = piece.to(device())  # NCCL moves CUDA tensors only
            dist.broadcast(piece, 0)
            if dst is not None and error is None:
                try:
                    dst.write(piece.cpu().numpy().tobytes())
                except OSError as e:
                    error = f"{e.strerror or e}: {dst.name}"
    finally:
        for f in (src, dst):
            if f is not None:
                try:
                    f.close()
                except OSError as e:  # a full disk can show at close
                    error = error or f"{e.strerror or e}: {f.name}"
    return error


def _agree(path: Path, error: str | None, copy: _Receiving | None) -> None:
    """Collective: every rank learns every rank's error; if there is one, receivers delete their temp dir
    and every rank raises the same message."""
    if copy is not None and copy.error and not error:
        error = copy.error
    errors = [(r, host, e) for r, (host, e) in enumerate(all_gather_object((socket.gethostname(), error))) if e]
    if not errors:
        return
    if copy is not None:
        copy.discard()
    shown = "; ".join(f"rank {r} ({host}): {e}" for r, host, e in errors)
    raise RlhfkitError(f"copying {path} to every node's disk failed: {shown}. Nothing was published there; free "
                       "space (or fix the error) and rerun the same command.")


def wait_until_visible(path: Path, wait_s: float | None = None) -> bool:
    """Whether `path` exists, looking again for up to wait_s seconds: another node's new dir can stay hidden on
    NFS until its cached "no such file" answer for the parent expires. Listing the parent refreshes that cache."""
    deadline = time.monotonic() + (VISIBLE_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            os.listdir(path.parent)  # revalidates the parent dir's cached entries (NFS)
        except OSError:
            pass
        if path.exists():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
