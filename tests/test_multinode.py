"""Multi-node torchrun on one machine (CPU, gloo): two torchrun agents ("nodes") meet at a c10d
rendezvous on loopback, as two hosts of a cluster meet at the head node's address.

* two nodes equal one process over the same global batch (the 2x rule of tests/helpers.py), for
  DDP and for HSDP (train.shard_size = processes per node: shard within a node, replicate across);
* a node lost (--nnodes=1:2 --max-restarts): one agent and its workers are killed with SIGKILL; the
  survivor restarts alone from the newest checkpoint, and its state equals a run resumed by hand
  from that checkpoint on one node; a node back: the run continues on two;
* ranks that see different run directories (storage not shared) stop together, in one line;
* the same on two network namespaces joined by a veth pair (two hosts with their own addresses,
  GLOO_SOCKET_IFNAME set), where this machine allows it (root, `ip netns`).

docs/multinode.md gives the commands as run here. Every process tree is killed at the end of its
test (tests/helpers.py's Run).

    python -m pytest tests/test_multinode.py           # CI: ~2 min on 2 CPU cores
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pmf_fast.checkpoint import list_checkpoints
from tests.helpers import (
    ROOT,
    Run,
    assert_close_by_rule,
    assert_same_weights,
    free_port,
    load,
    log_steps,
    train_cmd,
    train_steps,
    wait_for_step,
    worker_logs,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
# the c10d rendezvous, tuned for a test: a node missing for 3 s is dead (default 15 s), and once
# the minimum number of nodes is there the rendezvous waits 10 s for more (default 30 s; it ends
# at once when all --nnodes are there)
RDZV_CONF = "last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3"


def agent(nnodes, nproc, port, log_dir, *script, max_restarts=0, host="127.0.0.1"):
    """One torchrun agent (a node) joining the c10d rendezvous at host:port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}", "--rdzv-id=pmf-test", f"--rdzv-conf={RDZV_CONF}",
            f"--max-restarts={max_restarts}", f"--log-dir={log_dir}", "--tee=3", *script]


def start_nodes(tmp_path, tag, commands, port=None):
    """Start one agent per command; with the rendezvous `port` on loopback, the others only once
    the first one listens there (it then hosts the rendezvous store: the one node not to lose)."""
    runs = [Run(commands[0], str(tmp_path), f"{tag}0")]
    t0 = time.time()
    while port is not None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if not runs[0].alive() or time.time() - t0 > 120:
                pytest.fail(f"the first agent does not listen on {port}\n{runs[0].describe()}")
            time.sleep(0.1)
    return runs + [Run(cmd, str(tmp_path), f"{tag}{i}") for i, cmd in enumerate(commands[1:], 1)]


@pytest.fixture
def nodes(tmp_path):
    started = []

    def start(tag, commands, port=None):
        runs = start_nodes(tmp_path, tag, commands, port)
        started.extend(runs)
        return runs
    yield start
    for r in started:
        r.kill_tree()


# ----------------------------------------------------------------------------- 1. two nodes = one process
def worker(out):
    """Run under torchrun: the optimizer steps of tests/test_dist.py (helpers.train_steps) with DDP,
    then with HSDP (shard within a node, replicate across nodes), each rank on its slice of the
    global batch; rank 0 saves the full parameters and the mean losses of each."""
    import torch.distributed as dist

    from pmf_fast.dist import cleanup
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world, per_node = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_WORLD_SIZE"])
    result = {"world": world, "hosts": [h for h, _ in zip(_all_hosts(), range(world))]}
    for parallel, shard_size in (("ddp", 0), ("fsdp", per_node)):
        params, losses = train_steps(rank, world, parallel, shard_size=shard_size)
        dist.all_reduce(losses)
        result[parallel] = params, losses / world
    if rank == 0:
        torch.save(result, out)
    cleanup()


def _all_hosts():
    from pmf_fast.dist import all_gather_objects
    return all_gather_objects(socket.gethostname())


def test_two_nodes_equal_one_process(tmp_path, nodes, one_process_steps):
    """DDP and HSDP over 2 nodes x 2 processes: the losses and every parameter after the steps
    equal one process over the same global batch (the 2x rule). One launch runs both."""
    out, port = tmp_path / "out.pt", free_port()
    script = [os.path.abspath(__file__), "--worker", str(out)]
    for r in nodes("node", [agent(2, 2, port, tmp_path / f"log{i}", *script) for i in range(2)], port):
        rc, _, _ = r.wait(240)
        assert rc == 0, r.describe()
    got = torch.load(out)
    assert got["world"] == 4
    assert_equal_to_one_process(got, one_process_steps, "2 nodes x 2")


def assert_equal_to_one_process(got, single, label):
    """The ddp and fsdp runs' losses and parameters against one process (fp64 / fp32), the 2x rule."""
    (p64, l64), (p32, l32) = single
    for parallel in ("ddp", "fsdp"):
        params, losses = got[parallel]
        assert_close_by_rule(losses, l64, l32, f"{parallel} losses")
        for n in p64:
            assert_close_by_rule(params[n], p64[n], p32[n], f"{parallel} {label} {n}", relative_atol=True)


# ----------------------------------------------------------------------------- 1b. two hosts on a veth pair
@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair, 10.231.0.1 and .2: [(netns, interface, address)].
    Needs root and iproute2's `ip netns`; skips otherwise."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("the veth variant needs root, `ip` and `unshare` (network namespaces)")
    tag = f"pmf{os.getpid() % 100000}"
    hosts = [(f"{tag}a", f"{tag}a", "10.231.0.1"), (f"{tag}b", f"{tag}b", "10.231.0.2")]

    def ip(*args):
        return subprocess.run(["ip", *args], capture_output=True, text=True)
    try:
        made = [ip("netns", "add", ns) for ns, _, _ in hosts]
        if any(r.returncode for r in made):
            pytest.skip(f"cannot create network namespaces here: {' '.join(r.stderr.strip() for r in made)}")
        steps = [("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])]
        for ns, dev, addr in hosts:
            steps += [("link", "set", dev, "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                      ("-n", ns, "link", "set", dev, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            r = ip(*step)
            if r.returncode:
                pytest.skip(f"cannot set up the veth pair: ip {' '.join(step)}: {r.stderr.strip()}")
        yield hosts
    finally:
        for ns, _, _ in hosts:
            ip("netns", "del", ns)


def test_two_hosts_on_a_veth_pair(tmp_path, nodes, one_process_steps, two_hosts):
    """The two nodes as two hosts (own network namespace, address and host name), gloo bound to the
    veth interface by GLOO_SOCKET_IFNAME, the rendezvous at the first host's address: DDP and HSDP
    over 2 hosts x 1 process equal one process."""
    out, port = tmp_path / "out.pt", free_port()
    script = [os.path.abspath(__file__), "--worker", str(out)]
    hosts_file = tmp_path / "hosts"                          # each host's /etc/hosts (a private mount)
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{a} host{i}\n" for i, (_, _, a) in enumerate(two_hosts)))
    commands = []
    for i, (ns, dev, _) in enumerate(two_hosts):
        inner = " ".join(agent(2, 1, port, tmp_path / f"log{i}", *script, host=two_hosts[0][2]))
        commands.append(["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "sh", "-c",
                         f"hostname host{i} && mount --bind {hosts_file} /etc/hosts && "
                         f"GLOO_SOCKET_IFNAME={dev} exec {inner}"])
    for r in nodes("host", commands):
        rc, _, _ = r.wait(240)
        assert rc == 0, r.describe()
    got = torch.load(out)
    assert got["world"] == 2 and sorted(got["hosts"]) == ["host0", "host1"], got   # two host names
    assert_equal_to_one_process(got, one_process_steps, "2 hosts")


# ----------------------------------------------------------------------------- 2. a node lost
C = 6                                          # checkpoint every C steps; node 1 is lost after the first
STEPS = 24


def attempts(log_dir):
    """{attempt: stdout of local rank 0} of one agent's workers."""
    return {a: text for (a, local), text in worker_logs(log_dir, "stdout").items() if local == 0}


def test_a_node_lost_then_back(tmp_path, nodes):
    """--nnodes=1:2 --max-restarts=3: node 1 (its agent and worker) is killed with SIGKILL after the
    first checkpoint; node 0's agent restarts its worker alone, which resumes from the newest
    checkpoint (a lock left by a killed rank 0 is stale) and trains on. The job is then stopped
    (SIGTERM to the agent: a checkpoint) and both nodes start again: the run continues on two and
    finishes, every step logged once. What the survivor trained alone equals the same checkpoint
    resumed by hand on one node. (A node joining the running elastic job is torchrun's scale-up,
    which hangs in torch 2.14: docs/multinode.md.)"""
    port, run_dir = free_port(), tmp_path / "run"
    train_args = train_cmd(tmp_path, "run", "train.log_every=1", "train.stop_check_every=1", f"train.ckpt_every={C}",
                           f"train.steps={STEPS}")

    def start(tag, port):
        return nodes(tag, [agent("1:2", 1, port, tmp_path / f"{tag}log{i}", *train_args, max_restarts=3)
                           for i in range(2)], port)
    a, b = start("node", port)
    wait_for_step(a, run_dir, C + 1)
    b.kill_tree()                                            # node 1 lost: its agent and worker, SIGKILL
    kept = tmp_path / "kept"
    kept.mkdir()
    shutil.copy(run_dir / f"ckpt_{C:08d}.pt", kept)
    assert len(load(kept / f"ckpt_{C:08d}.pt")["train"]["ranks"]) == 2          # written on two nodes

    def alone():
        log = attempts(tmp_path / "nodelog0")
        return len(log) > 1 and f"\nstep {C + 2} " in log[max(log)]
    t0 = time.time()
    while not alone():
        assert a.alive() and time.time() - t0 < 180, f"no step {C + 2} on the survivor\n{a.describe()}"
        time.sleep(0.05)
    os.kill(a.proc.pid, signal.SIGTERM)                      # the job stopped: its worker writes a checkpoint
    a.wait()
    log = attempts(tmp_path / "nodelog0")
    last = log[max(log)]
    assert f"resumed from {run_dir}/ckpt_{C:08d}.pt at step {C}" in last and "(1 ranks" in last, last
    stop = max(s for s, _ in list_checkpoints(run_dir))
    assert C + 2 <= stop < STEPS and f"stopped at step {stop} (SIGTERM received)" in last, last
    shutil.copy(run_dir / f"ckpt_{stop:08d}.pt", kept)

    for r in start("back", free_port()):                     # both nodes again: the run continues on two
        rc, _, _ = r.wait()
        assert rc == 0, r.describe()
    texts = [t for i in range(2) for t in attempts(tmp_path / f"backlog{i}").values()]
    assert any(f"resumed from {run_dir}/ckpt_{stop:08d}.pt at step {stop}" in t and "(2 ranks" in t
               for t in texts), texts
    assert log_steps(run_dir) == list(range(1, STEPS + 1))  # every step logged once

    # by hand: the checkpoint the survivor resumed, on one node (one process, no torchrun), to its stop
    hand = tmp_path / "hand"
    hand.mkdir()
    shutil.copy(kept / f"ckpt_{C:08d}.pt", hand)
    r = Run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(hand), f"train.steps={stop}"],
            str(tmp_path), "hand")
    rc, out, _ = r.wait()
    assert rc == 0 and "resuming on 1 ranks from a 2-rank run" in out, r.describe()
    assert_same_weights(load(hand / f"ckpt_{stop:08d}.pt"), load(kept / f"ckpt_{stop:08d}.pt"),
                        "the survivor alone vs the same checkpoint resumed by hand on one node")


def failed_on_both(runs, tmp_path, log):
    """Both agents exited non-zero; the stderr of their two workers (logs under tmp_path/<log><i>)."""
    for r in runs:
        rc, _, _ = r.wait(180)
        assert rc != 0, r.describe()
    errs = [text for i in range(2) for text in worker_logs(tmp_path / f"{log}{i}", "stderr").values()]
    assert len(errs) == 2, errs
    return errs


# ----------------------------------------------------------------------------- 3. ranks stop together
def test_every_rank_stops_on_a_held_run_or_a_run_directory_not_shared(tmp_path, nodes):
    """Two nodes on a run directory that another live process holds: rank 0's refusal stops every
    rank, in one line naming the holder. Two nodes whose run directories differ (one holds a
    checkpoint, the other is local and empty): every rank stops, in one line naming the ranks,
    hosts and paths, and neither directory is changed."""
    shared, local = tmp_path / "shared", tmp_path / "local"
    overrides = ["train.log_every=1"]
    port = free_port()
    hold = f"from pmf_fast.lock import RunLock; RunLock({str(shared / 'run')!r}).acquire(); print('held', flush=True); "
    holder = subprocess.Popen([sys.executable, "-c", hold + "import time; time.sleep(300)"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "held"
        runs = nodes("held", [agent(2, 1, port, tmp_path / f"hlog{i}", *train_cmd(shared, "run", *overrides))
                              for i in range(2)], port)
        for text in failed_on_both(runs, tmp_path, "hlog"):
            lines = text.strip().splitlines()
            assert lines[-1].startswith("error: ") and f"in use by another run (host {socket.gethostname()}, pid " \
                f"{holder.pid}, since " in lines[-1] and "Traceback" not in text, text
    finally:
        holder.kill()
        holder.wait()

    from pmf_fast.checkpoint import save_checkpoint
    from pmf_fast.config import get_config
    cfg = get_config("pMF-XS/4-test", ["train.batch_size=16", f"train.out_dir={shared}", *overrides])
    os.remove(shared / "run" / "run.lock")                   # left by the killed holder (stale, but not needed)
    ckpt = save_checkpoint(str(shared / "run"), 3, {"config": cfg.to_dict(), "train": {"step": 3, "ranks": []}})
    before = sorted(os.listdir(shared / "run"))
    port = free_port()
    runs = nodes("split", [agent(2, 1, port, tmp_path / f"slog{i}", *train_cmd(d, "run", *overrides))
                           for i, d in enumerate((shared, local))], port)
    for text in failed_on_both(runs, tmp_path, "slog"):
        line = text.strip().splitlines()[-1]
        assert line.startswith("error: the ranks disagree on the checkpoint to resume from:"), text
        assert "see ckpt_00000003.pt (train) in " + str(shared / "run") in line and \
            "see no checkpoint (train) in " + str(local / "run") in line and "storage every node sees" in line, line
    assert sorted(os.listdir(shared / "run")) == before and os.path.exists(ckpt)
    assert not local.exists() or os.listdir(local) == []


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2])
