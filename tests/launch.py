"""Launching scripts on several local ranks with torchrun: one node, or two on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The test environment, with the project importable and one thread per rank."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), out.get("PYTHONPATH", "")])
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def run_ranks(script: Path, *args: str, nproc: int = 2) -> str:
    """Run ``script`` on ``nproc`` local ranks (torchrun), failing with its output; returns it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def run_two_nodes(script: Path, *args: str) -> None:
    """Two torchrun invocations, one process each, joined on 127.0.0.1 like two nodes."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
         str(script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
        for node in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)
