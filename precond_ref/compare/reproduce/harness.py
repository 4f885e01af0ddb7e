"""What the ``reproduce`` experiments share: optimizers by name, the two training loops, the
learning-rate sweep, the run cache and the spectral measurements.

Everything runs on PyTorch in float32 on one thread (the experiments are tiny; a fixed thread count
keeps the summation order fixed). The tasks:

- **digits**: the MLP, CNN and autoencoder of ``compare`` (:mod:`precond_ref.compare.digits`, its
  weights, split and loss), mini-batches of 64 in a seed-dependent order.
- **char LM**: a small pre-norm causal transformer on the characters of this project's own
  documentation (README and ``docs/``, minus the generated ``docs/reproduce.md``, frozen at one
  commit and shipped with the package: :mod:`precond_ref.compare.reproduce.corpus`), as the
  examples train; random windows, validation on the held-out last 10% of the text.

The learning-rate sweep (:meth:`Runner.tune`): a log grid of powers of sqrt(10)
(:func:`precond_ref.compare.grid_factors`) centred on a method's paper value, extended until a rate
beats both neighbours, each rate trained as long as the evaluation runs on the first 80% of the
training data (90% of the LM text) and scored on the rest with tuning seeds that are never
evaluation seeds; the best mean is then run on every evaluation seed against the test data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ...adapters import torch as pt
from ...benchmarks import common
from .. import digits, grid_factors
from ..methods import entry_by_name
from ..training import make_torch_optimizer
from . import baselines
from .corpus import text as corpus_text

DTYPE = torch.float32
#: The torch device of every tensor (set by the command from ``--device``).
DEVICE = "cpu"


# ---------------------------------------------------------------------------------------------
# Optimizers by name


def _embedding(name: str, _: Any) -> bool:
    # The ASGO authors' trainer sends embeddings to its fallback Adam (module-level: a stable repr).
    return "token" in name or "position" in name


def _muon_excluded(name: str) -> bool:
    return _embedding(name, None) or name.startswith("head")


@dataclass(frozen=True)
class Opt:
    """One optimizer of the experiments: ``build(named_params, lr, **overrides)``."""

    name: str
    label: str
    library: bool  # a precond_ref method (True) or a reference baseline (False)
    needs_batch: bool = False

    def build(self, named: list, lr: float, model: str = "*", **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer over ``named`` at learning rate ``lr``.

        Library methods take the hyperparameters of ``compare``'s table for ``model`` (the papers'
        values, :data:`precond_ref.compare.methods.METHODS`), ``overrides`` in core names on top,
        through ``compare``'s :func:`~precond_ref.compare.training.make_torch_optimizer` (eager).
        """
        params = [p for _, p in named]
        kw = dict(overrides)
        n = self.name
        if n == "adam":
            return torch.optim.Adam(params, lr=lr, **kw)
        if n == "sgd_momentum":
            return torch.optim.SGD(params, lr=lr, **{"momentum": 0.9, **kw})
        if n == "adagrad":  # diagonal AdaGrad (Duchi et al.): a sum of squares, no decay
            return torch.optim.Adagrad(params, lr=lr, **kw)
        if n == "rmsprop":  # RF-RMSProp's rule and hyperparameters with the root put back
            core = {**entry_by_name("rf_rmsprop").kwargs_for(model), "weight_decay": 0.0, **kw}
            core.pop("learning_rate", None)
            return baselines.RootRMSPropReference(named, lr=lr, **core)
        if n == "muon":  # embeddings and the read-out to its AdamW part, by Muon's convention
            return baselines.MuonReference(named, lr=lr, adam_filter=_muon_excluded, **{"weight_decay": 0.0, **kw})
        if n in ("shampoo1", "shampoo2"):
            return baselines.ShampooReference(named, lr=lr, **{"sides": int(n[-1]), **kw})
        if n == "shampoo_sum":  # Gupta et al.'s Algorithm: summed factors, powers -1/4, no momentum, no graft
            return baselines.ShampooReference(named, lr=lr, **{"sides": 2, "b2": 1.0, "momentum": 0.0, "graft": False,
                                                                 "accumulate": "sum", **kw})
        entry = entry_by_name("asgo" if n == "asgo_theory" else n)
        # One weight decay for every method of a claim: none (the caller may override it).
        core = {**entry.kwargs_for(model), **({"weight_decay": 0.0} if "weight_decay" in entry.kwargs_for(model) else {}),
                **kw, "learning_rate": lr}
        if n == "asgo_theory":  # Algorithm 1: no momentum, summed statistic, no RMS target, no decay
            core.update(b1=0.0, accumulator="sum", rms_target=None, weight_decay=0.0, precondition_every=1)
        if n in ("asgo", "asgo_theory"):  # the authors' split: embeddings (and 1-D parameters) to the fallback Adam
            extra = {k: core[k] for k in ("accumulator", "precondition_every") if k in core}
            return pt.ASGO(
                named, lr=lr, betas=(core["b1"], core["b2"]), weight_decay=core["weight_decay"],
                rms_target=core["rms_target"], fallback_filter=_embedding, compile=False, **extra,
            )
        optimizer, notes = make_torch_optimizer(entry, named, core, {"compile": False})
        if notes:  # pragma: no cover - every method has its torch class
            raise RuntimeError(f"{n}: {notes}")
        return optimizer


OPTS = {
    o.name: o
    for o in (
        Opt("adam", "Adam (torch.optim)", False),
        Opt("sgd_momentum", "SGD-momentum (torch.optim)", False),
        Opt("adagrad", "diagonal AdaGrad (torch.optim)", False),
        Opt("rmsprop", "RMSProp (RF-RMSProp with the root, reference baseline)", False, needs_batch=True),
        Opt("shampoo1", "one-sided Shampoo (reference baseline)", False),
        Opt("shampoo2", "Shampoo (reference baseline)", False),
        Opt("shampoo_sum", "Shampoo (Gupta et al.'s algorithm, reference baseline)", False),
        Opt("muon", "Muon (reference baseline)", False),
        Opt("asgo", "ASGO", True),
        Opt("asgo_theory", "ASGO (Algorithm 1)", True),
        Opt("agd", "AGD", True),
        Opt("sketchy", "Sketchy", True),
        Opt("rf_rmsprop", "RF-RMSProp", True, needs_batch=True),
        Opt("if_shampoo", "IF-Shampoo", True, needs_batch=True),
        Opt("mbf", "MBF", True),
    )
}


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_step(optimizer: Any, loss_fn: Callable, extra: dict, observe: Optional[Callable], step: int, named: list) -> tuple:
    """One training step: ``(loss, seconds)``; ``observe(step, named, optimizer)`` runs between the
    backward pass and the optimizer step, outside the timed part."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    _sync()
    elapsed = time.perf_counter() - start
    if observe is not None:
        observe(step, named, optimizer)
    start = time.perf_counter()
    optimizer.step(**extra)
    _sync()
    return loss.item(), elapsed + time.perf_counter() - start


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (counters included), as ``bench`` counts them."""
    return common.state_bytes(dict(optimizer.state))


def nonfinite_steps(optimizer: torch.optim.Optimizer) -> int:
    """The library's count of skipped non-finite steps (its ``nonfinite_count`` state), max over parameters."""
    counts = [int(s["nonfinite_count"]) for s in optimizer.state.values() if "nonfinite_count" in s]
    return max(counts, default=0)


#: The state entries that are second-moment statistics (the preconditioner's gradient statistics),
#: by optimizer: not momentum, grafting buffers, cached roots or counters.
_SECOND_MOMENTS = {"Adam": ("exp_avg_sq",), "ShampooReference": ("L", "R"), "Sketchy": ("sketches/",)}


def second_moment_bytes(optimizer: torch.optim.Optimizer) -> Optional[int]:
    """Bytes of the second-moment statistics in ``optimizer.state`` (:data:`_SECOND_MOMENTS`):
    Adam's ``v``, Shampoo's two Kronecker factors, Sketchy's per-axis FD sketches (basis, singular
    values, weights, escaped mass); ``None`` for other optimizers. Shampoo's 1-D parameters take
    Adam's step, so their ``v`` counts there."""
    keys = _SECOND_MOMENTS.get(type(optimizer).__name__)
    if keys is None:
        return None
    total = 0
    for p, state in optimizer.state.items():
        wanted = keys + (("v",) if type(optimizer).__name__ == "ShampooReference" and p.ndim < 2 else ())
        total += sum(v.numel() * v.element_size() for k, v in state.items()
                     if torch.is_tensor(v) and any(k == w or (w.endswith("/") and k.startswith(w)) for w in wanted))
    return total


# ---------------------------------------------------------------------------------------------
# Digits


_DIGITS: dict = {}


def digits_data(tuning: bool) -> tuple:
    """``(x_train, y_train, x_eval, y_eval)``: the test split, or (``tuning``) the validation split."""
    key = "tune" if tuning else "test"
    if key not in _DIGITS:
        x_train, y_train, x_test, y_test = digits.load_digits_split()
        _DIGITS["test"] = (x_train, y_train, x_test, y_test)
        _DIGITS["tune"] = digits.validation_split(x_train, y_train, 0.2)
    return _DIGITS[key]


def _init(model: str, seed: int, dtype: Any) -> dict:
    """Initial parameters of a ``compare`` model, or of ``wide<W>``: a 64-W-W-10 tanh MLP
    (weights N(0, 1/fan_in), zero biases), the digits model with axes well above Sketchy's rank."""
    if model.startswith("wide"):
        width = int(model[len("wide"):])
        rng = np.random.default_rng(seed)
        shapes = {"fc1": (width, 64), "fc2": (width, width), "fc3": (10, width)}
        initial = {k: {"weight": rng.standard_normal(s) / math.sqrt(s[1]), "bias": np.zeros(s[0])} for k, s in shapes.items()}
    else:
        initial = digits.init_params(model, seed)
    return {f"{k}.{kk}": torch.tensor(v, dtype=dtype, device=DEVICE, requires_grad=True) for k, layer in initial.items() for kk, v in layer.items()}


def _logits(model: str, params: dict, x: torch.Tensor) -> torch.Tensor:
    if model.startswith("wide"):
        hidden = torch.tanh(F.linear(x, params["fc1.weight"], params["fc1.bias"]))
        hidden = torch.tanh(F.linear(hidden, params["fc2.weight"], params["fc2.bias"]))
        return F.linear(hidden, params["fc3.weight"], params["fc3.bias"])
    return digits.torch_logits(model, params, x)


def _loss(model: str, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if model.startswith("wide"):
        logits = _logits(model, params, x)  # bfloat16 logits are scored in float32, others in their dtype
        return F.cross_entropy(logits.float() if torch.finfo(logits.dtype).bits < 32 else logits, y)
    return digits.torch_loss(model, params, x, y)


def _classifier(model: str) -> bool:
    return model.startswith("wide") or model in digits.CLASSIFIERS


def train_digits(
    opt: Opt, model: str, seed: int, epochs: int, lr: float, *, tuning: bool = False, batch_size: int = 64,
    overrides: Optional[dict] = None, observe: Optional[Callable] = None, observe_every: int = 1, dtype: Any = DTYPE,
    stop_after: Optional[int] = None,
) -> dict:
    """Train a ``compare`` model (or ``wide<W>``); per-epoch losses, accuracies and cumulative seconds.

    ``dtype`` is the dtype of the parameters, the data and the forward pass (bfloat16: a
    half-precision model). ``observe(step, named, optimizer)`` is called after every
    ``observe_every``-th backward pass, before the optimizer step (the gradients are in ``.grad``).
    Its time is not counted. ``stop_after``: return the first losses after that many steps (a
    fingerprint, :func:`fingerprint`).
    """
    x_train, y_train, x_eval, y_eval = digits_data(tuning)
    params = _init(model, seed, dtype)
    named = list(params.items())
    optimizer = opt.build(named, lr, "mlp" if model.startswith("wide") else model, **(overrides or {}))
    extra = {"batch_size": batch_size} if opt.needs_batch else {}
    xt, yt = torch.tensor(x_train, dtype=dtype, device=DEVICE), torch.tensor(y_train, device=DEVICE)
    xe, ye = torch.tensor(x_eval, dtype=dtype, device=DEVICE), torch.tensor(y_eval, device=DEVICE)
    steps_per_epoch = len(x_train) // batch_size
    out: dict = {"epoch_train_loss": [], "epoch_eval_loss": [], "epoch_eval_accuracy": [], "epoch_seconds": [], "step_seconds": []}
    clock, step, diverged, first = 0.0, 0, False, []
    with torch.no_grad():
        out["initial_train_loss"] = _loss(model, params, xt, yt).item()
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(x_train))).to(DEVICE)
        for i in range(steps_per_epoch):
            index = order[i * batch_size : (i + 1) * batch_size]
            value, elapsed = _timed_step(
                optimizer, lambda: _loss(model, params, xt[index], yt[index]), extra,
                observe if observe is not None and step % observe_every == 0 else None, step, named,
            )
            out["step_seconds"].append(elapsed)
            clock += elapsed
            step += 1
            if len(first) < FINGERPRINT_STEPS:
                first.append(value)
            if stop_after is not None and step >= stop_after:
                return {"first_losses": first}
            if not math.isfinite(value):
                diverged = True
                break
        with torch.no_grad():
            train_loss = _loss(model, params, xt, yt).item()
            eval_loss = _loss(model, params, xe, ye).item()
            accuracy = None
            if _classifier(model):
                accuracy = (_logits(model, params, xe).argmax(1) == ye).double().mean().item()
        out["epoch_train_loss"].append(train_loss if math.isfinite(train_loss) else None)
        out["epoch_eval_loss"].append(eval_loss if math.isfinite(eval_loss) else None)
        out["epoch_eval_accuracy"].append(accuracy)
        out["epoch_seconds"].append(clock)
        if diverged or not math.isfinite(train_loss):
            diverged = True
            break
    out.update(
        diverged=diverged, state_bytes=state_bytes(optimizer), second_moment_bytes=second_moment_bytes(optimizer),
        nonfinite_steps=nonfinite_steps(optimizer), final_train_loss=out["epoch_train_loss"][-1],
        final_eval_loss=out["epoch_eval_loss"][-1], final_eval_accuracy=out["epoch_eval_accuracy"][-1], steps=step,
        seconds=clock, parameter_bytes=sum(p.numel() * p.element_size() for p in params.values()), first_losses=first,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Character-level language model


def _cpu_independent(drawn: Any) -> Any:
    """``drawn`` (a float64 tensor of random draws, or a module of float64 parameters) rounded to
    float32: the same on every CPU. torch's float32 normal and uniform draws are computed by
    another kernel on a CPU with AVX2 than on one without (a rounding unit apart in most elements),
    its float64 ones by the same sequence of operations up to contraction into fused multiply-adds
    (at most a float64 rounding unit apart), which rounding to float32 removes but in a vanishing
    fraction of elements (those within a float64 unit of a float32 rounding boundary)."""
    return drawn.to(torch.float32)


class CharTransformer(torch.nn.Module):
    """Token and position embeddings, pre-norm causal transformer blocks, a linear read-out;
    its parameters made in ``dtype`` by torch's default initialisations."""

    def __init__(self, vocabulary: int, context: int, width: int, layers: int, heads: int, dtype: Any = None):
        super().__init__()
        self.token = torch.nn.Embedding(vocabulary, width, dtype=dtype)
        self.position = torch.nn.Embedding(context, width, dtype=dtype)
        block = torch.nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True, dtype=dtype
        )
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width, dtype=dtype)
        self.head = torch.nn.Linear(width, vocabulary, dtype=dtype)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        hidden = self.token(ids) + self.position(torch.arange(length, device=ids.device))
        hidden = self.blocks(hidden, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


_CORPUS: dict = {}


def corpus() -> tuple:
    """``(train_ids, validation_ids, vocabulary_size)``: the packaged text of README.md and
    docs/**/*.md (:mod:`precond_ref.compare.reproduce.corpus`), the last 10% held out."""
    if not _CORPUS:
        text = corpus_text()
        vocabulary = sorted(set(text))
        lookup = {ch: i for i, ch in enumerate(vocabulary)}
        ids = np.fromiter((lookup[ch] for ch in text), dtype=np.int64, count=len(text))
        split = int(len(ids) * 0.9)
        _CORPUS.update(train=ids[:split], validation=ids[split:], vocabulary=len(vocabulary), characters=len(text))
    return _CORPUS["train"], _CORPUS["validation"], _CORPUS["vocabulary"]


def _windows(ids: np.ndarray, batch: int, context: int, rng: np.random.Generator) -> tuple:
    starts = rng.integers(0, len(ids) - context - 1, size=batch)
    window = np.stack([ids[s : s + context + 1] for s in starts])
    return torch.from_numpy(window[:, :-1]).to(DEVICE), torch.from_numpy(window[:, 1:]).to(DEVICE)


def train_lm(
    opt: Opt, lm: dict, seed: int, steps: int, lr: float, *, tuning: bool = False, overrides: Optional[dict] = None,
    observe: Optional[Callable] = None, observe_every: int = 1, stop_after: Optional[int] = None, dtype: Any = DTYPE,
) -> dict:
    """Train the char transformer ``lm`` (width, layers, heads, context, batch) for ``steps`` steps,
    its parameters and arithmetic in ``dtype``.

    Returns the per-step training loss and cumulative seconds, and the evaluation loss (mean over
    ``lm["eval_batches"]`` fixed windows) of the held-out text, or while ``tuning`` of the last 10%
    of the training text (the model then trains on the first 90%).
    """
    train_ids, validation_ids, vocabulary = corpus()
    if tuning:
        cut = int(len(train_ids) * 0.9)
        train_ids, validation_ids = train_ids[:cut], train_ids[cut:]
    torch.manual_seed(seed)
    # Drawn in float64 and rounded to float32 whatever ``dtype`` is: torch's float32 draws differ
    # between its CPU kernels (AVX2 against none) by a rounding unit, its float64 draws much less
    # (:func:`_cpu_independent`).
    model = _cpu_independent(CharTransformer(vocabulary, lm["context"], lm["width"], lm["layers"], lm["heads"], torch.float64))
    model = model.to(DEVICE, dtype)
    named = list(model.named_parameters())
    optimizer = opt.build(named, lr, "lm", **(overrides or {}))
    extra = {"batch_size": lm["batch"] * lm["context"]} if opt.needs_batch else {}
    rng = np.random.default_rng([seed, 7])
    losses, seconds, clock, diverged = [], [], 0.0, False
    for step in range(steps):
        inputs, targets = _windows(train_ids, lm["batch"], lm["context"], rng)
        value, elapsed = _timed_step(
            optimizer, lambda: F.cross_entropy(model(inputs).reshape(-1, vocabulary), targets.reshape(-1)), extra,
            observe if observe is not None and step % observe_every == 0 else None, step, named,
        )
        clock += elapsed
        losses.append(value if math.isfinite(value) else None)
        seconds.append(clock)
        if stop_after is not None and step + 1 >= stop_after:
            return {"first_losses": losses[:FINGERPRINT_STEPS]}
        if not math.isfinite(value):
            diverged = True
            break
    eval_rng = np.random.default_rng(12345)  # the same windows for every run
    with torch.no_grad():
        held = [
            F.cross_entropy(model(x).reshape(-1, vocabulary), y.reshape(-1)).item()
            for x, y in (_windows(validation_ids, lm["batch"], lm["context"], eval_rng) for _ in range(lm["eval_batches"]))
        ]
    eval_loss = float(np.mean(held))
    tail = [v for v in losses[-max(1, steps // 10) :] if v is not None]
    return {
        "step_loss": losses, "step_seconds": seconds, "diverged": diverged or not math.isfinite(eval_loss),
        "final_eval_loss": eval_loss if math.isfinite(eval_loss) else None,
        "final_train_loss": float(np.mean(tail)) if tail and not diverged else None,
        "seconds": clock, "steps": len(losses), "state_bytes": state_bytes(optimizer),
        "nonfinite_steps": nonfinite_steps(optimizer), "first_losses": losses[:FINGERPRINT_STEPS],
    }


# ---------------------------------------------------------------------------------------------
# Synthetic matrix regression with gradients of a controlled rank, and the Beale function


def train_synthetic(opt: Opt, rank: int, seed: int, steps: int, lr: float, *, tuning: bool = False,
                    shape: tuple = (32, 64), batch: int = 32, dtype: Any = DTYPE) -> dict:
    """Least squares ``0.5 E||W x - W* x||^2`` over ``W`` of ``shape`` (out, in) with inputs in a
    fixed ``rank``-dimensional subspace of R^in: every mini-batch gradient ``E[(W - W*) x x^T]`` has
    rank at most ``rank``. Within the subspace the input scales are spread over two decades (an
    ill-conditioned problem that rewards preconditioning). The problem (subspace, scales, W*) is
    fixed per seed; ``tuning`` draws the problem of seed ``1000 + seed`` (a validation problem).
    Returns the expected loss ``0.5 ||(W - W*) C^{1/2}||_F^2`` (C the input covariance) after
    every step, the final one, and ``log_area``: the mean of its log10 over the run. ``dtype``: of the
    parameters and the arithmetic (the inputs rounded to float32 whatever it is, so that runs in two
    dtypes meet the same inputs)."""
    out_dim, in_dim = shape
    rng = np.random.default_rng([seed + (1000 if tuning else 0), 31])
    basis, _ = np.linalg.qr(rng.standard_normal((in_dim, rank)))
    scales = np.logspace(0, -2, rank)
    target = rng.standard_normal(shape) / math.sqrt(in_dim)
    mix = torch.tensor(basis * scales, dtype=dtype, device=DEVICE)  # x = basis diag(scales) z
    w_star = torch.tensor(target, dtype=dtype, device=DEVICE)
    weight = torch.zeros(shape, dtype=dtype, device=DEVICE, requires_grad=True)
    # No weight decay: the minimiser is W*, not a shrunk W*.
    optimizer = opt.build([("fc.weight", weight)], lr, "mlp", **({"weight_decay": 0.0} if opt.library else {}))
    extra = {"batch_size": batch} if opt.needs_batch else {}
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def expected() -> float:
        with torch.no_grad():
            return 0.5 * float((((weight - w_star) @ mix) ** 2).sum())

    losses, diverged = [expected()], False
    for step in range(steps):
        x = _cpu_independent(torch.randn(batch, rank, generator=gen, dtype=torch.float64)).to(DEVICE, dtype) @ mix.T
        value, _ = _timed_step(optimizer, lambda: 0.5 * ((x @ (weight - w_star).T) ** 2).sum(1).mean(), extra, None, step, [])
        if not math.isfinite(value):
            diverged = True
            break
        losses.append(expected())
    final = losses[-1] if not diverged and math.isfinite(losses[-1]) else None
    # The area under the log10 loss curve per step: what ASGO-4 scores (lower is faster).
    area = float(np.mean(np.log10(np.maximum(losses, 1e-300)))) if final is not None else None
    return {"losses": losses, "final_loss": final, "log_area": area, "diverged": diverged or final is None,
            "first_losses": losses[1 : FINGERPRINT_STEPS + 1]}


def beale(point: torch.Tensor) -> torch.Tensor:
    """Beale's function, minimum 0 at (3, 0.5)."""
    x, y = point[0], point[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


#: Beale's function below this value counts as its minimum (0 at (3, 0.5)) reached: within about
#: 3e-4 of the minimiser, where its Hessian's eigenvalues are 0.30 and 49.
BEALE_REACHED = 1e-8


def train_beale(opt: Opt, seed: int, steps: int, lr: float, *, tuning: bool = False, overrides: Optional[dict] = None) -> dict:
    """Minimise Beale's function from a start drawn per seed in [-1.5, 1.5] x [-1.5, 1.5] (seed
    ``1000 + seed`` while ``tuning``), float64; the trajectory, ``log10`` of the final value and
    ``steps_to_minimum``: the first step whose value is below :data:`BEALE_REACHED` (``steps + 1``
    when none is: the count is censored at the budget); ``score``, what a rate sweep ranks: the
    steps to the minimum, and for a run that never reaches it ``steps + 1`` plus how many decades
    its final value lies above the threshold (so that rates none of which reach it still differ)."""
    rng = np.random.default_rng([seed + (1000 if tuning else 0), 17])
    point = torch.tensor(rng.uniform(-1.5, 1.5, 2), dtype=torch.float64, device=DEVICE, requires_grad=True)
    optimizer = opt.build([("point", point)], lr, "mlp", **{"weight_decay": 0.0, **(overrides or {})})
    path, values, diverged = [point.detach().cpu().tolist()], [], False
    for step in range(steps):
        value, _ = _timed_step(optimizer, lambda: beale(point), {}, None, step, [])
        values.append(value)
        if not math.isfinite(value):
            diverged = True
            break
        path.append(point.detach().cpu().tolist())
    with torch.no_grad():
        final = float(beale(point))
    ok = math.isfinite(final) and not diverged
    reached = next((i + 1 for i, v in enumerate(values) if v < BEALE_REACHED), steps + 1)
    return {"path": path, "values": values, "diverged": not ok, "first_losses": values[:FINGERPRINT_STEPS],
            "final_log10": math.log10(max(final, 1e-300)) if ok else None,
            "steps_to_minimum": float(reached) if ok else None,
            "score": float(reached) + (max(0.0, math.log10(max(final, 1e-300) / BEALE_REACHED)) if reached > steps else 0.0)
            if ok else None}


# ---------------------------------------------------------------------------------------------
# Runs, cached, and the learning-rate sweep


#: Steps whose losses make a run's fingerprint (the first loss is before any update).
FINGERPRINT_STEPS = 5


def _jsonable_kw(kw: dict) -> dict:
    """Overrides as JSON values: a torch dtype as its name (``"torch.bfloat16"``)."""
    return {k: str(v) if isinstance(v, torch.dtype) else v for k, v in (kw or {}).items()}


def _torch_kw(kw: dict) -> dict:
    return {k: getattr(torch, v[len("torch."):]) if isinstance(v, str) and v.startswith("torch.") else v
            for k, v in (kw or {}).items()}


def fingerprint_dtype(recipe: dict) -> Any:
    """The dtype a fingerprint of ``recipe`` is taken in: float64 for a float32 run of torch
    (digits, synthetic, char LM), else the run's own (bfloat16 runs; Beale's and the online
    problems' runs are float64 already). A float32 run's first losses differ between CPUs by far
    more than their rounding: another BLAS kernel rounds each product differently, and an
    ill-conditioned preconditioner amplifies it within five steps (to 1e-2 relative for ASGO's
    Algorithm 1 on a sample of the rank-1 problem between an Intel and an AMD CPU); in float64 the same
    amplification leaves the losses within :func:`fingerprint_tolerance`."""
    if recipe["task"] in ("digits", "synthetic", "lm") and recipe.get("dtype", str(DTYPE)) == str(torch.float32):
        return torch.float64
    return None


def fingerprint(recipe: dict) -> list:
    """The first :data:`FINGERPRINT_STEPS` losses of the run ``recipe`` describes (a record of
    :attr:`Runner.fingerprints`), run for only those steps in :func:`fingerprint_dtype`."""
    task, opt, seed, lr = recipe["task"], OPTS[recipe["opt"]], recipe["seed"], recipe["lr"]
    overrides = _torch_kw(recipe.get("overrides"))
    dtype = fingerprint_dtype(recipe) or DTYPE
    if task == "digits":
        dtype = fingerprint_dtype(recipe) or getattr(torch, recipe["dtype"][len("torch."):])
        return train_digits(opt, recipe["model"], seed, 1, lr, overrides=overrides, dtype=dtype,
                            stop_after=FINGERPRINT_STEPS)["first_losses"]
    if task == "lm":
        return train_lm(opt, recipe["lm"], seed, FINGERPRINT_STEPS, lr, overrides=overrides, dtype=dtype)["first_losses"]
    if task == "synthetic":
        return train_synthetic(opt, recipe["rank"], seed, FINGERPRINT_STEPS, lr, dtype=dtype)["first_losses"]
    if task == "beale":
        return train_beale(opt, seed, FINGERPRINT_STEPS, lr, overrides=overrides)["first_losses"]
    raise ValueError(f"fingerprint: unknown task {task!r}")


def fingerprint_in_float64(recipe: dict) -> bool:
    """Whether the fingerprint of ``recipe`` is taken in float64 (:func:`fingerprint_dtype`; the
    runs that are float64 already); bfloat16 runs keep their own dtype."""
    return recipe.get("dtype") != "torch.bfloat16"


def fingerprint_tolerance(recipe: dict) -> float:
    """Relative tolerance of a recomputed fingerprint, from the rounding model: for bfloat16 runs
    ``4 eps`` (a few rounding units of the parameters themselves); for the float64 fingerprints
    ``sqrt(eps)`` (1.5e-8): a rounding unit amplified over five steps as much as the worst float32
    run's (about 3e5, the 1e-2 of :func:`fingerprint_dtype` from 1.2e-7) stays below 1e-10, while a
    change of the arithmetic moves a loss by far more. A loss that rounding moves further (float64
    amplifies more where float32's rounding hid the ill-conditioning) is not compared
    (:func:`precond_ref.compare.reproduce.papers.conditioned_steps`)."""
    if not fingerprint_in_float64(recipe):
        return 4 * float(torch.finfo(torch.bfloat16).eps)
    return math.sqrt(float(torch.finfo(torch.float64).eps))


def _rounded(values: list) -> list:
    """Twelve significant digits: far finer than :func:`fingerprint_tolerance`."""
    return [None if v is None or not math.isfinite(v) else float(f"{v:.12g}") for v in values]


class Runner:
    """Runs experiments with a cache (``--paper all`` shares e.g. the Adam char-LM runs), a
    progress callback per finished run, and a fingerprint per evaluated configuration (its first
    seed's first losses, :attr:`fingerprints`) for the freshness test."""

    def __init__(self, on_run: Callable[[str], None] = lambda text: None):
        self.cache: dict = {}
        self.on_run = on_run
        self.tuned: dict = {}
        self.fingerprints: dict = {}
        self.paper = ""

    def record(self, recipe: dict, result: dict) -> None:
        """Keep the fingerprint of an evaluation run's configuration (one seed per configuration)."""
        if recipe.get("tuning") or "first_losses" not in result:
            return
        config = repr(sorted((k, repr(v)) for k, v in recipe.items() if k != "seed"))
        if config not in self.fingerprints:
            losses = fingerprint(recipe) if fingerprint_dtype(recipe) is not None else result["first_losses"]
            self.fingerprints[config] = {**recipe, "losses": _rounded(losses), "papers": []}
        record = self.fingerprints[config]
        if self.paper and self.paper not in record["papers"]:
            record["papers"].append(self.paper)

    def digits(self, opt: str, model: str, seed: int, epochs: int, lr: float, **kw: Any) -> dict:
        key = ("digits", opt, model, seed, epochs, lr, kw.get("tuning", False), repr(sorted((kw.get("overrides") or {}).items())),
               str(kw.get("dtype", DTYPE)))
        if kw.get("observe") is not None or key not in self.cache:
            result = train_digits(OPTS[opt], model, seed, epochs, lr, **kw)
            self.on_run(f"{opt} on digits {model}, seed {seed}" + (", lr sweep" if kw.get("tuning") else ""))
            self.record({"task": "digits", "opt": opt, "model": model, "seed": seed, "lr": lr,
                          "tuning": kw.get("tuning", False), "overrides": _jsonable_kw(kw.get("overrides")),
                          "dtype": str(kw.get("dtype", DTYPE))}, result)
            if kw.get("observe") is not None:
                return result
            self.cache[key] = result
        return self.cache[key]

    def lm(self, opt: str, lm: dict, seed: int, steps: int, lr: float, **kw: Any) -> dict:
        key = ("lm", opt, repr(sorted(lm.items())), seed, steps, lr, kw.get("tuning", False),
               repr(sorted((kw.get("overrides") or {}).items())))
        if kw.get("observe") is not None or key not in self.cache:
            result = train_lm(OPTS[opt], lm, seed, steps, lr, **kw)
            self.on_run(f"{opt} on the char LM, seed {seed}" + (", lr sweep" if kw.get("tuning") else ""))
            self.record({"task": "lm", "opt": opt, "lm": dict(lm), "seed": seed, "lr": lr, "tuning": kw.get("tuning", False),
                          "overrides": _jsonable_kw(kw.get("overrides"))}, result)
            if kw.get("observe") is not None:
                return result
            self.cache[key] = result
        return self.cache[key]

    def synthetic(self, opt: str, rank: int, seed: int, steps: int, lr: float, **kw: Any) -> dict:
        key = ("synthetic", opt, rank, seed, steps, lr, kw.get("tuning", False))
        if key not in self.cache:
            self.cache[key] = train_synthetic(OPTS[opt], rank, seed, steps, lr, **kw)
            self.on_run(f"{opt} on the rank-{rank} regression, seed {seed}" + (", lr sweep" if kw.get("tuning") else ""))
            self.record({"task": "synthetic", "opt": opt, "rank": rank, "seed": seed, "lr": lr,
                          "tuning": kw.get("tuning", False)}, self.cache[key])
        return self.cache[key]

    def beale(self, opt: str, seed: int, steps: int, lr: float, **kw: Any) -> dict:
        key = ("beale", opt, seed, steps, lr, kw.get("tuning", False), repr(sorted((kw.get("overrides") or {}).items())))
        if key not in self.cache:
            self.cache[key] = train_beale(OPTS[opt], seed, steps, lr, **kw)
            self.record({"task": "beale", "opt": opt, "seed": seed, "lr": lr, "tuning": kw.get("tuning", False),
                          "overrides": _jsonable_kw(kw.get("overrides"))}, self.cache[key])
        return self.cache[key]

    def tune(
        self, task: str, opt: str, center: float, points: int, seeds: list, run: Callable[[float, int], dict], metric: str,
        extend: int = 3,
    ) -> dict:
        """Best learning rate by ``metric`` (lower is better) averaged over ``seeds``.

        The grid is ``points`` powers of sqrt(10) around ``center``. While the best rate sits at an
        edge of the grid, one more rate beyond that edge is tried, and while every rate diverged,
        one below the lowest (at most ``extend`` times in all): the sweep ends when a rate scores
        better than both of its neighbours. A rate where any seed diverged scores +inf.
        ``points == 1`` is no sweep (the centre is the paper's value). The result keeps every score
        per rate and seed, and ``edge``: whether the chosen rate is still at an edge of the
        extended grid (the optimum may lie beyond it).
        """
        key = (task, opt, center, points, tuple(seeds))
        if key in self.tuned:
            return self.tuned[key]
        if points <= 1:
            result = {"lr": center, "center": center, "tuned": False, "scores": {}, "edge": False, "extended": 0}
            self.tuned[key] = result
            return result
        scores: dict = {}  # rate -> per-seed scores (None: diverged)

        def score(lr: float) -> float:
            if lr not in scores:
                values = []
                for seed in seeds:
                    res = run(lr, seed)
                    value = res.get(metric)
                    values.append(value if value is not None and not res["diverged"] and math.isfinite(value) else None)
                scores[lr] = values
            values = scores[lr]
            return math.inf if any(v is None for v in values) else sum(values) / len(values)

        for factor in grid_factors(points):
            score(center * factor)
        extended = 0
        step = math.sqrt(10.0)
        while True:
            rates = sorted(scores)
            means = [score(lr) for lr in rates]
            best = min(range(len(rates)), key=lambda i: means[i])
            finite = math.isfinite(means[best])
            at_edge = not finite or best in (0, len(rates) - 1)
            if not at_edge or extended >= extend:
                break
            score(rates[-1] * step if finite and best == len(rates) - 1 else rates[0] / step)
            extended += 1
        result = {
            "lr": rates[best] if finite else center, "center": center, "tuned": True,
            "seeds": list(seeds), "metric": metric, "edge": at_edge, "extended": extended,
            "scores": {f"{lr:.3g}": scores[lr] for lr in rates},
        }
        self.tuned[key] = result
        return result


# ---------------------------------------------------------------------------------------------
# Spectral measurements


def stable_rank(matrix: np.ndarray) -> float:
    """``||G||_F^2 / ||G||_2^2`` (between 1 and the rank); 0 for a zero matrix."""
    s = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    return float((s**2).sum() / s[0] ** 2) if s[0] > 0 else 0.0


def top_fraction(factor: np.ndarray, k: int) -> float:
    """Fraction of the trace of a PSD matrix held by its ``k`` largest eigenvalues."""
    values = np.clip(np.linalg.eigvalsh(np.asarray(factor, dtype=np.float64)), 0.0, None)
    total = values.sum()
    return float(np.sort(values)[::-1][:k].sum() / total) if total > 0 else 0.0


def top_subspace(factor: np.ndarray, k: int) -> np.ndarray:
    """Orthonormal basis ``(d, k)`` of the top-``k`` eigenvectors of a symmetric matrix."""
    _, vectors = np.linalg.eigh(np.asarray(factor, dtype=np.float64))
    return vectors[:, ::-1][:, :k]


def subspace_distance(u: np.ndarray, v: np.ndarray) -> float:
    """Mean squared sine of the principal angles between two ``k``-dim subspaces (0 equal, 1 orthogonal)."""
    cosines = np.clip(np.linalg.svd(u.T @ v, compute_uv=False), 0.0, 1.0)
    return float(np.mean(1.0 - cosines**2))
