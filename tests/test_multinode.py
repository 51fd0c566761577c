"""Two hosts on one machine: two network namespaces joined by a veth pair (10.213.7.1 and .2, addresses that
exist only inside them), one torchrun node in each (2 nodes × 1 process, gloo), each node with its own output
dir and data cache, so nothing is shared on disk. ZeRO-3 SFT and PPO (actor at ZeRO-3) match one process; both
nodes killed mid-run resume across the two hosts to the same weights; the whole pipeline runs across them; a
node that never joins ends the run."""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_ppo import metrics, ppo_config, prompts_file, reward_dir  # noqa: F401 (fixtures)
from test_training import ENV, _free_port, pairs_file, run_ok, train_losses, write_config  # noqa: F401 (fixture)

ADDR = ("10.213.7.1", "10.213.7.2")
PORT = 29500  # inside the namespaces: no other process can hold it
TOLERANCE = 1e-4  # stated: losses, PPO metrics and final weights of 2 hosts vs 1 process, absolute
NODE_WAIT_S = 240


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2) for network namespaces"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable here: {probe.stderr.strip()}"
    return None


class TwoHosts:
    """Namespaces h0, h1 (named per test process), joined by veth ends v0, v1."""

    def __init__(self):
        tag = os.getpid() % 10**6
        self.ns = (f"rlk{tag}h0", f"rlk{tag}h1")
        self.ifname = (f"rlk{tag}v0", f"rlk{tag}v1")

    def create(self) -> None:
        for ns in self.ns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.ifname[0], "type", "veth", "peer", "name", self.ifname[1])
        for ns, ifname, addr in zip(self.ns, self.ifname, ADDR):
            _ip("link", "set", ifname, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Stop whatever still runs inside (processes this test started), then delete both namespaces (which
        deletes the veth pair)."""
        for node, ns in enumerate(self.ns):
            self.kill(node)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def kill(self, node: int) -> None:
        """SIGKILL every process of a node: torchrun's agent and its workers (which run in sessions of their own)."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def start(self, node: int, argv: list[str], **env) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[node], *argv],
                                env={**ENV, "GLOO_SOCKET_IFNAME": self.ifname[node], **env}, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def start_node(self, node: int, args: list[str], run_dir: Path, **env) -> subprocess.Popen:
        """`rlhfkit ARGS` as node `node` of 2 under torchrun, with its own output dir and data cache."""
        return self.start(node, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                 "1", "--node_rank", str(node), "--master_addr", ADDR[0], "--master_port", str(PORT),
                                 "--rdzv-conf", "timeout=60", "-m", "rlhfkit.cli", *args,
                                 f"run.output_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'cache'}",
                                 "--no-progress"], **env)

    def start_deepspeed_node(self, node: int, args: list[str], run_dir: Path, hostfile: Path) -> subprocess.Popen:
        """The same through the `deepspeed` launcher, each node started by itself (`--no_ssh`, as under a
        scheduler), with a hostfile of the two hosts."""
        return self.start(node, [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                                 "--no_ssh", "--node_rank", str(node), "--master_addr", ADDR[0], "--master_port",
                                 str(PORT), "--no_local_rank", "--module", "rlhfkit.cli", *args,
                                 f"run.output_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'cache'}",
                                 "--no-progress"])

    def run_both(self, args: list[str], run_dirs: tuple[Path, Path], hostfile: Path | None = None) -> list[str]:
        """Both nodes under torchrun, or under the `deepspeed` launcher when given its hostfile."""
        procs = [self.start_deepspeed_node(n, args, run_dirs[n], hostfile) if hostfile else
                 self.start_node(n, args, run_dirs[n]) for n in (0, 1)]
        outs = [_finish(p) for p in procs]
        for n, (p, out) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, f"node {n}:\n{out[-4000:]}"
        return outs


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _finish(p: subprocess.Popen, timeout: float = NODE_WAIT_S) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"a node ran past {timeout} s:\n{out[-4000:]}")
    return out


@pytest.fixture(scope="module")
def hosts():
    problem = _netns_problem()
    if problem:
        pytest.skip(f"two-host test skipped: {problem}")
    h = TwoHosts()
    try:
        h.create()
        yield h
    finally:
        h.remove()


def node_dirs(root: Path) -> tuple[Path, Path]:
    """Each node's own output dir; node 1 gets the prepared data (`rlhfkit data prepare` or a copy of run/data
    on every node: nothing else is shared)."""
    return root / "node0" / "run", root / "node1" / "run"


def stage_data_on(run_dir: Path, prepared: Path) -> None:
    shutil.copytree(prepared / "data", run_dir / "data")


def _weights(run_dir: Path, stage: str) -> dict:
    return load_file(str(run_dir / stage / "final" / "model.safetensors"))


def _listing(d: Path) -> dict[str, str]:
    """Every file under d with its SHA-256."""
    import hashlib

    assert d.is_dir(), f"{d} is missing"
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _step_times(run_dir: Path, stage: str, key: str) -> float:
    return statistics.median(metrics_of(run_dir, stage, key)[1:])  # the first step also warms up


def metrics_of(run_dir: Path, stage: str, key: str) -> list[float]:
    from rlhfkit.tracking import read_metrics

    return [m[key] for m in read_metrics(run_dir / stage / "metrics.jsonl") if key in m]


def test_zero3_sft_on_two_hosts_matches_one_process_and_resumes_after_both_nodes_are_killed(
        hosts, tmp_path, pairs_file):
    """Same global batch (8): one process micro 4 × accumulation 2; two hosts micro 2 × accumulation 2."""
    sft = {"max_steps": 8, "learning_rate": 3e-3, "gradient_accumulation_steps": 2, "save_every": 2,
           "warmup_steps": 2}
    one = write_config(tmp_path / "one", pairs_file, sft={**sft, "micro_batch_size": 4})
    run_ok(["sft", str(one), "--no-progress"])
    ref = tmp_path / "one" / "run"

    two = write_config(tmp_path / "two", pairs_file, sft={**sft, "micro_batch_size": 2, "zero_stage": 3})
    straight = node_dirs(tmp_path / "straight")
    stage_data_on(straight[1], ref)
    hosts.run_both(["sft", str(two)], straight)
    a, b = train_losses(ref, "sft"), train_losses(straight[0], "sft")
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) < TOLERANCE, (a, b)
    assert _max_diff(_weights(ref, "sft"), _weights(straight[0], "sft")) < TOLERANCE
    # No shared disk: each node published its own part of each checkpoint; the final model was exported once,
    # on rank 0's node, and copied to node 1's disk for the stages after it.
    assert _listing(straight[1] / "sft" / "final") == _listing(straight[0] / "sft" / "final")
    parts = [(d / "sft" / "checkpoints" / "step-0000008" / "COMPLETE").read_text() for d in straight]
    assert "rng_rank0.pt" in parts[0] and "rng_rank1.pt" not in parts[0] and "model/" in parts[0]
    assert "rng_rank1.pt" in parts[1] and "rng_rank0.pt" not in parts[1] and "model/" not in parts[1]
    print(f"\nSFT ZeRO-3 median step time: 1 process {_step_times(ref, 'sft', 'train/step_time_s'):.3f} s, "
          f"2 hosts {_step_times(straight[0], 'sft', 'train/step_time_s'):.3f} s")

    # Kill node 1 once step 4 is published on node 0: node 0 must notice and stop by itself (bounded), saying
    # which rank lost the others in which stage; then both nodes rerun and resume from a step both disks hold.
    killed = node_dirs(tmp_path / "killed")
    stage_data_on(killed[1], ref)
    procs = [hosts.start_node(n, ["sft", str(two)], killed[n]) for n in (0, 1)]
    marker = killed[0] / "sft" / "checkpoints" / "step-0000004" / "COMPLETE"
    deadline = time.time() + NODE_WAIT_S
    while not marker.exists():
        assert all(p.poll() is None for p in procs), "a node ended before it could be killed: " + _finish(procs[0])
        assert time.time() < deadline, "step 4 was never published"
        time.sleep(0.02)
    hosts.kill(1)
    procs[1].communicate()
    t0 = time.time()
    out = _finish(procs[0], timeout=60)
    took = time.time() - t0
    assert procs[0].returncode != 0 and not (killed[0] / "sft" / "final").exists(), out[-3000:]
    assert "rank 0 of 2" in out and "lost the other ranks during sft" in out, out[-3000:]
    print(f"node 0 stopped {took:.1f} s after node 1 was killed")

    outs = hosts.run_both(["sft", str(two)], killed)
    assert "resumed from" in outs[0], outs[0][-3000:]
    straight_w, resumed_w = _weights(straight[0], "sft"), _weights(killed[0], "sft")
    assert all(torch.equal(straight_w[k], resumed_w[k]) for k in straight_w)  # exact: same ranks, same order
    assert train_losses(killed[0], "sft") == train_losses(straight[0], "sft")


def test_ppo_with_the_actor_at_zero3_on_two_hosts_matches_one_process(hosts, tmp_path, prompts_file, reward_dir):
    ppo = dict(steps=3, eval_every=0, eval_prompts=8, actor={"learning_rate": 1e-3, "micro_batch_size": 4},
               critic={"learning_rate": 1e-3, "micro_batch_size": 4}, reward={"dtype": "float32", "zero_stage": 0})
    one = ppo_config(tmp_path / "one", prompts_file, reward_dir, **ppo)
    run_ok(["ppo", str(one), "--no-progress"])
    ref = tmp_path / "one" / "run"
    ppo["actor"] = {**ppo["actor"], "zero_stage": 3}
    two = ppo_config(tmp_path / "two", prompts_file, reward_dir, **ppo)
    runs = node_dirs(tmp_path / "two")
    stage_data_on(runs[1], ref)
    hosts.run_both(["ppo", str(two)], runs)
    assert metrics(ref, "tokens/generated") == metrics(runs[0], "tokens/generated")
    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "eval/score", "eval/kl"):
        a, b = metrics(ref, key), metrics(runs[0], key)
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < TOLERANCE, (key, a, b)
    assert _max_diff(_weights(ref, "ppo"), _weights(runs[0], "ppo")) < TOLERANCE
    assert _listing(runs[1] / "ppo" / "final") == _listing(runs[0] / "ppo" / "final")
    print(f"\nPPO median step time: 1 process {_step_times(ref, 'ppo', 'time/step'):.3f} s, "
          f"2 hosts {_step_times(runs[0], 'ppo', 'time/step'):.3f} s")


def test_the_pipeline_runs_across_two_hosts_without_a_shared_disk_under_the_deepspeed_launcher(hosts, tmp_path):
    """sft → rm → ppo → eval → export, one node per host started by the `deepspeed` launcher with a hostfile,
    each with its own output dir: every training stage's final/ reaches node 1's disk for the next stage; eval
    and export run on rank 0; a rerun skips every stage on both nodes."""
    from conftest import write_jsonl
    from test_pipeline import pipeline_config
    from test_training import synthetic_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(48))  # a path every node sees
    cfg = pipeline_config(tmp_path, data, export={"gguf": "none"})
    runs = node_dirs(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host0 slots=1\nhost1 slots=1\n")
    hosts.run_both(["pipeline", str(cfg)], runs, hostfile)
    for stage in ("sft", "rm", "ppo"):
        assert _listing(runs[1] / stage / "final") == _listing(runs[0] / stage / "final"), stage
    assert (runs[0] / "eval" / "eval.json").is_file() and (runs[0] / "export" / "export.json").is_file()
    outs = hosts.run_both(["pipeline", str(cfg)], runs, hostfile)
    for stage in ("sft", "rm", "ppo", "eval", "export"):
        assert f"pipeline: {stage} is complete, skipped" in outs[0], outs[0][-3000:]
    assert "pipeline: sft ..." not in outs[0] + outs[1]


def test_a_node_that_never_joins_ends_the_run_within_the_timeout(hosts, tmp_path, pairs_file):
    """Rank 0 alone, launched the way the `deepspeed` launcher or srun would (no torchrun agent): joining the
    process group waits RLHFKIT_DIST_TIMEOUT seconds, then the run stops naming the rank and the stage."""
    cfg = write_config(tmp_path, pairs_file, sft={"max_steps": 2})
    t0 = time.time()
    p = hosts.start(0, [sys.executable, "-m", "rlhfkit.cli", "sft", str(cfg), "--no-progress"],
                    RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR=ADDR[0], MASTER_PORT=str(PORT),
                    RLHFKIT_DIST_TIMEOUT="10")
    out = _finish(p, timeout=120)
    took = time.time() - t0
    assert p.returncode == 2, out[-3000:]
    assert "rank 0 of 2" in out and f"could not join the process group at {ADDR[0]}:{PORT} within 10 s" in out, out
    assert took < 60, took


# --- without root: two ranks on this machine, each with its own dir, stand in for two nodes' local disks ---
PARTS_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from rlhfkit.engine import distributed as D
from rlhfkit.engine.backend import begin_checkpoint, finish_checkpoint, latest_checkpoint

rank, world = D.init_distributed()
tmp = Path(sys.argv[1])
shared, own = tmp / "shared", tmp / f"node{rank}"
leaders = {"shared": D.disk_leader(shared), "own": D.disk_leader(own)}
for step in (2, 4, 6):
    ckpt = begin_checkpoint(own, step)
    (ckpt / f"rng_rank{rank}.pt").write_bytes(bytes(100 + rank))
    if rank == 0:
        (ckpt / "model").mkdir()
        (ckpt / "model" / "weights").write_bytes(b"w" * step)
    finish_checkpoint(ckpt, step, keep=3, meta={"step": step})
D.barrier()
if rank == 1:  # node 1 stopped before publishing step 6; its step 4 was damaged on its disk later
    import shutil
    shutil.rmtree(own / "checkpoints" / "step-0000006")
    (own / "checkpoints" / "step-0000004" / "rng_rank1.pt").write_bytes(b"x" * 101)  # same size, other bytes
D.barrier()
D.COPY_CHUNK_BYTES = 5  # several pieces per file
for disk in (own, shared):
    if rank == 0:
        (disk / "final" / "sub").mkdir(parents=True)
        (disk / "final" / "model.bin").write_bytes(bytes(range(23)))
        (disk / "final" / "sub" / "empty").write_bytes(b"")
    D.copy_dir_to_every_disk(disk / "final")
copies = {name: sorted([str(f.relative_to(d)), f.read_bytes().hex()] for f in d.rglob("*") if f.is_file())
          for name, d in (("own", own / "final"), ("shared", shared / "final"))}
copies["shared_dir"] = sorted(f.name for f in shared.iterdir())
chosen = latest_checkpoint(own)
complete = json.loads((own / "checkpoints" / "step-0000002" / "COMPLETE").read_text())
(tmp / f"result{rank}.json").write_text(json.dumps({"leaders": leaders, "chosen": chosen.name, "copies": copies,
                                                    "files": sorted(complete["files"])}))
D.barrier()
os._exit(0)  # no interpreter teardown under gloo (see cli._leave_process_group)
"""


def test_each_disk_publishes_its_own_part_resume_takes_the_newest_step_every_disk_holds_and_final_is_copied(tmp_path):
    script = tmp_path / "parts.py"
    script.write_text(PARTS_SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), str(script), str(tmp_path)], env=ENV, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in (0, 1)]
    assert [results[r]["leaders"] for r in (0, 1)] == [{"shared": 0, "own": 0}, {"shared": 0, "own": 1}]
    assert results[0]["files"] == ["model/weights", "rng_rank0.pt"] and results[1]["files"] == ["rng_rank1.pt"]
    assert results[0]["chosen"] == results[1]["chosen"] == "step-0000002"
    # final/ copied from rank 0's disk to the other disk in 5-byte pieces; on the shared disk nothing moved
    files = [["model.bin", bytes(range(23)).hex()], ["sub/empty", ""]]
    assert results[0]["copies"]["own"] == results[1]["copies"]["own"] == files
    assert results[0]["copies"]["shared"] == results[1]["copies"]["shared"] == files
    assert results[0]["copies"]["shared_dir"] == ["final"]
    said = p.stdout + p.stderr
    assert f"checkpoint {tmp_path / 'node0' / 'checkpoints' / 'step-0000006'}" not in said  # intact there
    assert (f"checkpoint {tmp_path / 'node1' / 'checkpoints' / 'step-0000006'} on rank 1's disk" in said
            and "was never published" in said)
    assert (f"checkpoint {tmp_path / 'node1' / 'checkpoints' / 'step-0000004'} on rank 1's disk" in said
            and "rng_rank1.pt does not match its SHA-256" in said)


COPY_FAILS_SCRIPT = r"""
import json, os, resource, signal, sys, time
from pathlib import Path
from rlhfkit.engine import distributed as D
from rlhfkit.errors import RlhfkitError

rank, world = D.init_distributed()
tmp = Path(sys.argv[1])
own = tmp / f"node{rank}"  # node 1's disk: a 1 MiB tmpfs, or a 1 MB file size limit where none can be mounted
D.COPY_CHUNK_BYTES = 1 << 16
if rank == 0:
    (own / "final").mkdir(parents=True)
    (own / "final" / "a.bin").write_bytes(b"a" * 300_000)
    (own / "final" / "b.bin").write_bytes(b"b" * 3_000_000)  # more than node 1's disk takes
elif sys.argv[2] == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))
t0 = time.time()
try:
    D.copy_dir_to_every_disk(own / "final")
    said = None
except RlhfkitError as e:
    said = str(e)
except Exception as e:
    said = f"{type(e).__name__}: {e}"
result = {"said": said, "took": time.time() - t0, "left": sorted(p.name for p in own.iterdir())}
(tmp / f"result{rank}.json").write_text(json.dumps(result))
D.barrier()
os._exit(0)
"""


def test_a_receiver_that_fails_mid_copy_stops_every_rank_with_one_message_and_leaves_no_temp_dir(tmp_path):
    """Node 1's disk fills while final/ is copied to it: rank 1 raised alone, rank 0 went on broadcasting (until
    the timeout, or a mismatched collective), and .final.tmp-* stayed on node 1's disk."""
    script = tmp_path / "copy_fails.py"
    script.write_text(COPY_FAILS_SCRIPT)
    disk = tmp_path / "node1"
    disk.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode == 0
    try:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(_free_port()), str(script), str(tmp_path), "tmpfs" if mounted else "fsize"],
                           env={**ENV, "RLHFKIT_DIST_TIMEOUT": "30"}, cwd=REPO, capture_output=True, text=True,
                           timeout=150)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
        left_on_node1 = sorted(f.name for f in disk.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    why = "No space left on device" if mounted else "File too large"
    for r in (0, 1):
        said = results[r]["said"] or ""
        assert said.startswith(f"copying {tmp_path / f'node{r}' / 'final'} to every node's disk failed: rank 1 ("), said
        assert f"{why}: " in said and "b.bin" in said and "Nothing was published there" in said, said
        assert results[r]["took"] < 20, results[r]
    assert results[0]["said"].split(": rank 1")[1] == results[1]["said"].split(": rank 1")[1]  # the same message
    assert left_on_node1 == results[1]["left"] == []  # no .final.tmp-*, no final/


def test_a_dir_another_node_published_is_waited_for(tmp_path):
    """On NFS a node's cached "no such file" for final/ lasts up to a minute: the check looks again."""
    import threading

    from rlhfkit.engine.distributed import wait_until_visible

    late = tmp_path / "final"
    threading.Timer(1.0, late.mkdir).start()
    t0 = time.time()
    assert wait_until_visible(late, wait_s=30)
    assert 0.9 < time.time() - t0 < 5
    assert not wait_until_visible(tmp_path / "never", wait_s=1.0)
