"""Which dense decompositions a torch optimizer step makes, and what each costs with the others torch offers.

On a GPU, Sketchy's and S-AdaGrad's steps are their decompositions: torch hands a float32
``linalg.svd`` to cuSOLVER's Jacobi ``gesvdj`` and a float32 ``linalg.eigh`` of order 32-512 to
its Jacobi ``syevj`` (the measurements: records/performance-archive.md, "On a GPU"). This
script records the decompositions of one refresh window of an optimizer on the bench's GPT (the
bench's settings for the method), then times each distinct call (operation, shape, dtype) as
recorded and in the alternatives torch offers on the device:

* ``svd``: the default, and on CUDA ``driver="gesvd"`` (QR iteration), ``"gesvdj"`` (Jacobi) and,
  for tall matrices, ``"gesvda"`` (approximate);
* ``eigh``: float32 as recorded, and float64 (on CUDA, ``syevd`` at every order);
* both: the left singular pairs by the ``eigh`` of the Gram (``decomposition="incremental_gram"``'s
  route) in float32 and float64.

Each row is the median of ``--repeats`` synchronised calls and its count per step over the window.
Run from the repository root, on the machine to measure::

    python examples/measure_decompositions.py --method sketchy --size reference
    python examples/measure_decompositions.py --method s_adagrad --size reference

It only measures: a change of a method's decomposition per device is made in ``precond_ref/sketch.py``
and ``precond_ref/linalg.py`` from these numbers and the accuracy tests there. Since those numbers,
``linalg.left_singular`` computes a float32 FD core's left singular pairs by the ``eigh`` of its
float64 Gram wherever float64 exists, so a run records those cores as float64 ``eigh`` calls of
their Gram (the SVD only where float64 is missing).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any, Callable


def _record(method: str, size_name: str, device: str) -> tuple[collections.Counter, int]:
    """The (operation, shape, dtype) of every ``torch.linalg.svd`` / ``eigh`` call in one refresh
    window of ``method``'s torch optimizer on the bench's GPT (its gradients from one batch), and
    the window's length."""
    import torch

    from precond_ref.benchmarks.common import contenders, refresh_period, torch_optimizer, update_extra
    from precond_ref.benchmarks.models import SIZES, batch_size_of, build_torch, random_batches, torch_loss

    size = SIZES["gpt"][size_name]
    (contender,), _ = contenders(method, False)
    module = build_torch("gpt", size, torch.float32, device)
    named = list(module.named_parameters())
    (x, y), = random_batches("gpt", size, device, torch.float32)[:1]
    torch_loss("gpt")(module, x, y).backward()
    optimizer, _ = torch_optimizer(contender, named, "off")
    extra = update_extra(contender, batch_size_of("gpt", size))
    window = max(1, refresh_period(contender.entry))
    for _ in range(window + 1):  # past the first steps, which make the state
        optimizer.step(**extra)
    import array_api_compat.torch.linalg as compat_linalg  # the core's namespace holds the same functions

    calls: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.linalg, name) for name in ("svd", "eigh")}

    def recording(name: str) -> Callable[..., Any]:
        def call(a, *args, **kwargs):
            calls[(name, tuple(a.shape), str(a.dtype).replace("torch.", ""))] += 1
            return originals[name](a, *args, **kwargs)
        return call

    modules = (torch.linalg, compat_linalg)
    try:
        for name in originals:
            for where in modules:
                setattr(where, name, recording(name))
        for _ in range(window):
            optimizer.step(**extra)
    finally:
        for name, fn in originals.items():
            for where in modules:
                setattr(where, name, fn)
    return calls, window


def _alternatives(op: str, shape: tuple, dtype: str, cuda: bool) -> dict[str, Callable[[Any], Any]]:
    """The ways to compute what the recorded call computes (the left singular pairs or the
    eigendecomposition), by name."""
    import torch

    def gram_eigh(dt):
        return lambda a: torch.linalg.eigh((a.to(dt) @ a.to(dt).mT))

    if op == "eigh":
        return {"eigh (as recorded)": torch.linalg.eigh,
                "eigh float64": lambda a: torch.linalg.eigh(a.double())}
    ways = {"svd (as recorded)": lambda a: torch.linalg.svd(a, full_matrices=False)}
    if cuda:
        for driver in ("gesvd", "gesvdj") + (("gesvda",) if shape[-2] > shape[-1] else ()):
            ways[f"svd {driver}"] = lambda a, d=driver: torch.linalg.svd(a, full_matrices=False, driver=d)
    ways["Gram eigh float32"] = gram_eigh(torch.float32)
    ways["Gram eigh float64"] = gram_eigh(torch.float64)
    return ways


def _median_ms(fn: Callable[[Any], Any], a: Any, repeats: int, sync: Callable[[], None]) -> float:
    fn(a)  # once untimed: cuSOLVER's workspace and handles
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(a)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="sketchy", help="a bench method key: sketchy, s_adagrad, ...")
    parser.add_argument("--size", default="reference", choices=("tiny", "small", "reference"))
    parser.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    calls, window = _record(args.method, args.size, device)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{args.method} on the {args.size} GPT, {name}, torch {torch.__version__}: "
          f"{sum(calls.values())} decomposition calls in a window of {window} steps")
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for (op, shape, dtype), count in sorted(calls.items(), key=lambda item: -item[1]):
        a = torch.randn(shape, generator=generator, device=device, dtype=getattr(torch, dtype))
        if op == "eigh":
            a = a @ a.mT / shape[-1]  # symmetric positive semi-definite, as the sketches' statistics
        for way, fn in _alternatives(op, shape, dtype, cuda).items():
            try:
                ms = _median_ms(fn, a, args.repeats, sync)
            except RuntimeError as err:  # a driver that refuses the shape
                print(f"  {op} {shape} {dtype}: {way} refused ({str(err).splitlines()[0]})")
                continue
            row = {"op": op, "shape": shape, "dtype": dtype, "calls_per_step": count / window, "way": way,
                   "ms_per_call": ms, "ms_per_step": ms * count / window}
            rows.append(row)
            print(f"  {op} {shape} {dtype} x {count / window:g}/step  {way:<20} {ms:9.3f} ms/call "
                  f"{row['ms_per_step']:9.2f} ms/step")
    return rows


if __name__ == "__main__":
    main()
