"""Multi-node training, proven on one machine: two network namespaces joined by a veth pair
are two hosts with their own addresses; torchrun runs one node in each (2 nodes × 1
process, a static rendezvous over TCP at node 0's address, gloo over the veth link) and
must write the SAE a single process writes with the same global batch and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.synthetic import sparse_rows, write_capture
from training.train.launch import run_spec

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.213.7"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two namespaces, ``(name, address, interface)`` each, linked by a veth pair."""
    tag = uuid.uuid4().hex[:6]
    hosts = [(f"saelab-{tag}-{i}", f"{SUBNET}.{i + 1}", f"sl{tag}{i}") for i in range(2)]
    created: list[str] = []
    try:
        for name, _, _ in hosts:
            _ip("netns", "add", name)
            created.append(name)
        (_, _, if0), (_, _, if1) = hosts
        _ip("link", "add", if0, "type", "veth", "peer", "name", if1)
        for name, address, interface in hosts:
            _ip("link", "set", interface, "netns", name)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", name, "link", "set", interface, "up")
            _ip("-n", name, "link", "set", "lo", "up")
    except (OSError, subprocess.SubprocessError) as exc:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        detail = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot create network namespaces here (needs root and ip): {detail}")
    yield hosts
    for name in created:  # deleting a namespace deletes its end of the veth pair
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _spec(acts: Path, out: Path) -> dict:
    return {"acts": str(acts), "out": str(out), "resume": False,
            "sae": {"d_in": 16, "n_latents": 64, "k": 4},
            "train": {"batch": 256, "tokens": 256 * 12, "lr": 3e-3, "seed": 3,
                      "checkpoint_every": 0, "init_rows": 1024, "holdout_rows": 1024,
                      "warmup_steps": 2}}


def test_two_nodes_over_tcp_match_one_process(two_hosts, tmp_path) -> None:
    acts = tmp_path / "acts"
    write_capture(acts, sparse_rows(6400, 16))
    single = run_spec(_spec(acts, tmp_path / "single"), progress=False)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(_spec(acts, tmp_path / "two-nodes")))
    master = two_hosts[0][1]
    procs = []
    for rank, (name, _, interface) in enumerate(two_hosts):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": interface, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}
        command = ["ip", "netns", "exec", name, sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                   "--master_addr", master, "--master_port", "29531", "-m",
                   "training.train.launch", str(spec_path), str(tmp_path / f"result{rank}.json")]
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    metrics = json.loads((tmp_path / "result0.json").read_text())
    assert metrics["steps"] == single["steps"] == 12
    ours = load_file(str(tmp_path / "two-nodes" / "sae.safetensors"))
    theirs = load_file(str(tmp_path / "single" / "sae.safetensors"))
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5)
    assert metrics["heldout_fvu"] == pytest.approx(single["heldout_fvu"], rel=1e-4)
