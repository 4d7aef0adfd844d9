"""Run `scripts.launch` as several JAX processes on this machine: a multi-host job in miniature (CPU, gloo).

  python -m scripts.launch_local --num_processes=2 --devices_per_process=4 -- \\
      --config=configs/lm/arith.py:size=tiny --workdir=runs/two_procs --config.mesh.fsdp=-1 --config.mesh.data=1

Everything after `--` goes to every process's `scripts.launch`, plus --coordinator_address (a free localhost port),
--num_processes and --process_id. Each process sees `devices_per_process` simulated CPU devices; together they form
one global mesh. Output lines are prefixed with `[p<i>]`. SIGTERM/SIGINT are forwarded to every process (which then
checkpoints and exits 0). The exit status is the first non-zero one of the processes, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    """A TCP port nobody on localhost listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def commands(launch_args: list[str], num_processes: int, port: int) -> list[list[str]]:
    """The `scripts.launch` command line of each process."""
    return [
        [
            sys.executable,
            "-m",
            "scripts.launch",
            *launch_args,
            f"--coordinator_address=localhost:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={i}",
        ]
        for i in range(num_processes)
    ]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}")
        out.flush()


def run(launch_args: list[str], *, num_processes: int = 2, devices_per_process: int = 4) -> int:
    """Starts the processes, streams their output, waits; returns the first non-zero exit status (else 0)."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes}, devices_per_process={devices_per_process}: need >= 1")
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    procs, pumps = [], []
    for i, cmd in enumerate(commands(launch_args, num_processes, free_port())):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", sys.stdout), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    return next((c for c in codes if c != 0), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("launch_args", nargs=argparse.REMAINDER, help="arguments of scripts.launch, after --")
    args = parser.parse_args()
    launch_args = args.launch_args[1:] if args.launch_args[:1] == ["--"] else args.launch_args
    if not launch_args:
        parser.error("give scripts.launch's arguments after --, e.g. -- --config=... --workdir=...")
    return run(launch_args, num_processes=args.num_processes, devices_per_process=args.devices_per_process)


if __name__ == "__main__":
    sys.exit(main())
