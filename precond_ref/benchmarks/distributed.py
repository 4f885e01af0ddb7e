"""Step time of the distributed preconditioner with 1, 2, 4, ... gloo processes on CPU.

``python -m precond_ref.benchmarks.distributed [--ranks 1 2 4] [--methods asgo if_shampoo sketchy]
[--layers 8] [--width 256] [--steps 5] [--threads 1]``

For each method and world size it starts that many processes (gloo backend, one file store),
builds an MLP of ``--layers`` square ``width x width`` Linear layers with biases on every rank,
gives every rank the same gradients (as DDP would) and times
:class:`precond_ref.adapters.torch_distributed` optimizer steps (after two warm-up steps, which
include the state's initialisation). Each rank does its share of the blocks' preconditioner work
and the updates are broadcast. Printed: the median step time of rank 0 and its speed-up over the
same class with one process, and the median CPU time of the busiest rank (the work split, which
stays readable on a loaded machine where the processes cannot run in parallel) and its ratio. Each process uses ``--threads`` intra-op threads, so that the
ranks, not the BLAS threads, share the cores; on a machine with fewer cores than ranks the extra
ranks only add communication. Not part of the test suite (timings need a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_CONFIGS = {
    "asgo": ("ASGO", dict(lr=1e-3)),
    "if_shampoo": ("IFShampoo", dict(lr=1e-3, batch_size=32)),
    "sketchy": ("Sketchy", dict(lr=1e-3, rank=32)),
    "mbf": ("MBF", dict(lr=1e-3, statistics_every=1, precondition_every=1)),
    "s_adagrad": ("SAdaGrad", dict(lr=1e-3, rank=32)),
}


def _worker(method: str, rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    import precond_ref.adapters.torch_distributed as ptd

    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
        cls, kwargs = _CONFIGS[method]
        opt = getattr(ptd, cls)(net.named_parameters(), **kwargs)
        gen = torch.Generator().manual_seed(1)
        times, cpu = [], []
        for step in range(2 + args.steps):
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=gen) / args.width
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            opt.step()
            dist.barrier()
            if step >= 2:
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
        # CPU seconds of the busiest rank: the work split, readable even on a loaded machine.
        busiest = [None] * world
        dist.all_gather_object(busiest, statistics.median(cpu))
        if rank == 0:
            print(json.dumps({"method": method, "ranks": world, "median_s": statistics.median(times),
                              "cpu_s": max(busiest), "owned": len(opt.owned_parameters())}), flush=True)
    finally:
        dist.destroy_process_group()


def _run(method: str, world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        common = ["--layers", str(args.layers), "--width", str(args.width), "--steps", str(args.steps),
                  "--threads", str(args.threads)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "precond_ref.benchmarks.distributed", "--worker", method, str(r), str(world),
                 init, *common],
                stdout=subprocess.PIPE, text=True,
            )
            for r in range(world)
        ]
        outs = [proc.communicate(timeout=args.timeout)[0] for proc in procs]
        if any(proc.returncode for proc in procs):
            raise RuntimeError(f"{method} with {world} ranks failed")
        return json.loads(next(line for line in outs[0].splitlines() if line.startswith("{")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m precond_ref.benchmarks.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--methods", nargs="+", default=["asgo", "if_shampoo", "sketchy"], choices=sorted(_CONFIGS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "RANK", "WORLD", "INIT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, rank, world, init = args.worker
        _worker(method, int(rank), int(world), init, args)
        return
    print(f"{args.layers} Linear layers {args.width}x{args.width} (+bias), {args.threads} thread(s) per rank, "
          f"median of {args.steps} steps")
    print(f"{'method':<12}{'ranks':>6}{'step ms':>10}{'speed-up':>10}{'busiest rank CPU ms':>21}{'CPU ratio':>11}"
          f"{'leaves on rank 0':>18}")
    for method in args.methods:
        base = None
        for world in args.ranks:
            row = _run(method, world, args)
            if world == 1:
                base = row
            speedup = f"{base['median_s'] / row['median_s']:.2f}" if base else "-"
            ratio = f"{base['cpu_s'] / row['cpu_s']:.2f}" if base else "-"
            print(f"{method:<12}{world:>6}{1e3 * row['median_s']:>10.1f}{speedup:>10}{1e3 * row['cpu_s']:>21.1f}"
                  f"{ratio:>11}{row['owned']:>18}", flush=True)


if __name__ == "__main__":
    main()
