r"""Standard small problems, written against the array API so they run on every backend.

Each problem is deterministic: its data and initial parameters are generated once, in float64
Python numbers, by :class:`random.Random` from a seed, and converted to the namespace, dtype and
device asked for. The same seed therefore gives the same problem on NumPy, CuPy, PyTorch, JAX and
``array_api_strict`` (up to the final rounding to the requested dtype), and a trace file
(:mod:`precond_ref.testing`) carries the data for implementations in other languages.

Conventions shared by all problems:

* parameters are nested dicts of arrays; weights are out-first (``(out, in)``, conv
  ``(out, in, kh, kw)``) and sit beside their bias under a common parent (``{"weight", "bias"}``),
  which is what weight/bias pairing in MBF and IF-Shampoo looks for;
* ``loss(params, step)`` is a 0-D array and ``grad(params, step)`` a tree like ``params``; ``step``
  only matters for the online problem, whose loss changes with the step;
* losses are means over the examples of a batch, and ``batch_size`` is the number of averaged
  examples (the root-free methods need it);
* gradients are hand-derived (no autodiff): the test suite checks them against finite differences
  and against torch autograd.
"""

from __future__ import annotations

import math
import random
import sys
from typing import Any, Callable

from array_api_compat import array_namespace, is_jax_namespace

from .._backend import array_device, is_tracer
from ..tree import path_str, tree_flatten, tree_unflatten
from .backends import resolve_dtype, resolve_namespace

__all__ = [
    "Problem",
    "Quadratic",
    "LeastSquares",
    "Logistic",
    "OnlineLogistic",
    "MLP",
    "CNN",
    "PROBLEMS",
    "get_problem",
    "available_problems",
]

Array = Any


class _Values:
    """A float64 array held as a flat Python list and a shape (row-major)."""

    __slots__ = ("shape", "values")

    def __init__(self, shape: tuple[int, ...], values: list[float]):
        assert len(values) == math.prod(shape)
        self.shape = tuple(shape)
        self.values = [float(v) for v in values]

    def to(self, xp: Any, dtype: Any, device: Any) -> Array:
        flat = xp.asarray(self.values, dtype=dtype, device=device)
        return xp.reshape(flat, self.shape)


def _gaussian(rng: random.Random, shape: tuple[int, ...], scale: float = 1.0) -> _Values:
    return _Values(shape, [scale * rng.gauss(0.0, 1.0) for _ in range(math.prod(shape))])


class Problem:
    """A deterministic small optimization problem with its loss and gradient.

    Subclasses define ``name``, ``description``, ``batch_size``, ``default_learning_rate``, fill
    ``self._params`` (initial parameters: nested dict of :class:`_Values`) and ``self._data`` (dict
    of :class:`_Values`) in ``__init__``, and implement ``_value_and_grad(params, data, step, xp)``.

    Parameters
    ----------
    seed:
        Seed of the generator of the data and the initial parameters.
    """

    name: str = ""
    description: str = ""
    batch_size: int = 1
    default_learning_rate: float = 1e-2

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._params: dict = {}
        self._data: dict[str, _Values] = {}
        self._cache: dict[tuple, dict[str, Array]] = {}
        self._jitted: Any = None

    # ------------------------------------------------------------------ public interface

    def init_params(self, xp: Any = None, dtype: Any = "float64", device: Any = None) -> dict:
        """The initial parameters as a nested dict of arrays of ``xp`` (NumPy by default).

        ``xp`` is a namespace or a backend name (``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``,
        ``"array_api_strict"``); ``dtype`` a dtype of it or its name. Every call returns new arrays.
        """
        xp = resolve_namespace(xp)
        dtype = resolve_dtype(xp, dtype)
        leaves, treedef = tree_flatten(self._params)
        return tree_unflatten(treedef, [v.to(xp, dtype, device) for v in leaves])

    def data(self, xp: Any = None, dtype: Any = "float64", device: Any = None) -> dict[str, Array]:
        """Every array the loss depends on (inputs, targets, the Hessian, ...), by name."""
        xp = resolve_namespace(xp)
        dtype = resolve_dtype(xp, dtype)
        return {k: v.to(xp, dtype, device) for k, v in self._data.items()}

    def loss(self, params: Any, step: int = 0) -> Array:
        """The loss at ``params`` on step ``step``'s data, a 0-D array of the parameters' dtype."""
        return self.value_and_grad(params, step, _need_grad=False)[0]

    def grad(self, params: Any, step: int = 0) -> Any:
        """The gradient of :meth:`loss`, a tree like ``params``."""
        return self.value_and_grad(params, step)[1]

    def value_and_grad(self, params: Any, step: int = 0, *, _need_grad: bool = True) -> tuple[Array, Any]:
        """``(loss, grad)`` in one pass."""
        leaves, treedef = tree_flatten(params)
        expected_leaves, expected = tree_flatten(self._params)
        shapes = {p: v.shape for p, v in zip(expected.paths, expected_leaves)}
        if sorted(map(path_str, treedef.paths)) != sorted(map(path_str, expected.paths)):
            raise ValueError(
                f"{self.name}: params must have the leaves {[path_str(p) for p in expected.paths]}, "
                f"got {[path_str(p) for p in treedef.paths]}"
            )
        for path, leaf in zip(treedef.paths, leaves):
            if tuple(leaf.shape) != shapes[path]:
                raise ValueError(f"{self.name}: {path_str(path)!r} must have shape {shapes[path]}, got {tuple(leaf.shape)}")
        xp = array_namespace(*leaves)
        step = step if hasattr(step, "shape") else int(step)
        if is_jax_namespace(xp) and not any(is_tracer(leaf) for leaf in leaves):
            # Eager JAX compiles every small operation separately; one jit of the whole
            # loss-and-gradient is far faster. ``step`` stays dynamic, so it compiles once.
            data = self._converted(xp, leaves[0].dtype, array_device(leaves[0]))
            if self._jitted is None:
                self._jitted = sys.modules["jax"].jit(self._value_and_grad, static_argnums=(3,))
            loss, grads = self._jitted(params, data, step, xp)
            # jit returns dicts with sorted keys; give the gradient the parameters' leaf order.
            grad_leaves, grad_def = tree_flatten(grads)
            by_path = dict(zip(grad_def.paths, grad_leaves))
            return loss, tree_unflatten(treedef, [by_path[p] for p in treedef.paths])
        if is_tracer(leaves[0]):  # inside a user's jax.jit: constants must not outlive the trace
            data = {k: v.to(xp, leaves[0].dtype, None) for k, v in self._data.items()}
        else:
            data = self._converted(xp, leaves[0].dtype, array_device(leaves[0]))
        return self._value_and_grad(params, data, step, xp)

    @property
    def param_paths(self) -> list[str]:
        """The leaf paths of the parameters, ``"fc1/weight"`` style, in tree order."""
        return [path_str(p) for p in tree_flatten(self._params)[1].paths]

    def options(self) -> dict:
        """The constructor arguments that define this problem (recorded in traces)."""
        return {"seed": self.seed}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ helpers

    def _converted(self, xp: Any, dtype: Any, device: Any) -> dict[str, Array]:
        key = (getattr(xp, "__name__", id(xp)), str(dtype), str(device))
        if key not in self._cache:
            self._cache[key] = {k: v.to(xp, dtype, device) for k, v in self._data.items()}
        return self._cache[key]

    def _value_and_grad(self, params: Any, data: dict, step: int, xp: Any) -> tuple[Array, Any]:
        raise NotImplementedError  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Shared pieces: affine layers and softmax cross-entropy.


def _affine(xp: Any, x: Array, layer: dict) -> Array:
    """``x Wᵀ + b`` for a batch ``x`` of shape (n, in)."""
    return xp.matmul(x, layer["weight"].mT) + layer["bias"]


def _affine_grads(xp: Any, x: Array, delta: Array) -> dict:
    """Gradients of an affine layer from its input ``x`` (n, in) and output gradient ``delta``."""
    return {"weight": xp.matmul(delta.mT, x), "bias": xp.sum(delta, axis=0)}


def _cross_entropy(xp: Any, logits: Array, onehot: Array) -> tuple[Array, Array]:
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    n = logits.shape[0]
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    log_norm = xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    log_prob = shifted - log_norm
    loss = -xp.sum(onehot * log_prob) / n
    return loss, (xp.exp(log_prob) - onehot) / n


def _onehot(labels: list[int], classes: int) -> _Values:
    return _Values((len(labels), classes), [1.0 if c == y else 0.0 for y in labels for c in range(classes)])


def _teacher_labels(rng: random.Random, inputs: list[list[float]], classes: int, noise: float) -> list[int]:
    """Labels of a random linear teacher with Gumbel noise (learnable but not separable)."""
    dim = len(inputs[0])
    teacher = [[rng.gauss(0.0, 1.0) for _ in range(dim)] for _ in range(classes)]
    labels = []
    for x in inputs:
        scores = [sum(w * xi for w, xi in zip(row, x)) - noise * math.log(-math.log(rng.random() or 1e-300)) for row in teacher]
        labels.append(max(range(classes), key=scores.__getitem__))
    return labels


def _rows(values: _Values) -> list[list[float]]:
    n, d = values.shape
    return [values.values[i * d : (i + 1) * d] for i in range(n)]


# ---------------------------------------------------------------------------------------------


class Quadratic(Problem):
    r"""A convex quadratic with a known Hessian.

    .. math:: f(\theta) = \tfrac12 (\theta - \theta^\star)^\top H (\theta - \theta^\star)

    with :math:`\theta = [\operatorname{vec}(W); b]` the row-major flattening of the weight
    ``linear/weight`` (3×4) followed by ``linear/bias`` (3), so :math:`H` is 15×15:
    :math:`H = Q\,\mathrm{diag}(h)\,Q^\top` with eigenvalues :math:`h` log-spaced from
    ``1/sqrt(condition)`` to ``sqrt(condition)`` and :math:`Q` a product of three Householder
    reflections. Data: ``hessian``, ``minimizer``. The gradient is exact (deterministic problem,
    ``batch_size`` 1).
    """

    name = "quadratic"
    description = "convex quadratic with a known 15x15 Hessian (weight 3x4 + bias 3)"
    batch_size = 1
    default_learning_rate = 1e-2

    def __init__(self, seed: int = 0, condition: float = 100.0):
        super().__init__(seed)
        if not condition >= 1.0:
            raise ValueError(f"condition must be >= 1, got {condition!r}")
        self.condition = float(condition)
        rng = random.Random(seed)
        out, inp = 3, 4
        dim = out * inp + out
        low, high = -0.5 * math.log10(condition), 0.5 * math.log10(condition)
        eig = [10.0 ** (low + (high - low) * i / (dim - 1)) for i in range(dim)]
        q = [[1.0 if i == j else 0.0 for j in range(dim)] for i in range(dim)]
        for _ in range(3):  # Q <- Q (I - 2 v vᵀ / vᵀv)
            v = [rng.gauss(0.0, 1.0) for _ in range(dim)]
            norm2 = sum(x * x for x in v)
            for row in q:
                proj = 2.0 * sum(r * x for r, x in zip(row, v)) / norm2
                for j in range(dim):
                    row[j] -= proj * v[j]
        hessian = [
            [sum(q[i][k] * eig[k] * q[j][k] for k in range(dim)) for j in range(dim)] for i in range(dim)
        ]
        for i in range(dim):  # exactly symmetric
            for j in range(i):
                hessian[i][j] = hessian[j][i] = 0.5 * (hessian[i][j] + hessian[j][i])
        self.eigenvalues = eig
        self._data = {
            "hessian": _Values((dim, dim), [x for row in hessian for x in row]),
            "minimizer": _gaussian(rng, (dim,)),
        }
        self._params = {"linear": {"weight": _gaussian(rng, (out, inp)), "bias": _gaussian(rng, (out,))}}

    def options(self) -> dict:
        return {"seed": self.seed, "condition": self.condition}

    def hessian(self, xp: Any = None, dtype: Any = "float64", device: Any = None) -> Array:
        """:math:`H`, in the flattening order of the class docstring."""
        return self.data(xp, dtype, device)["hessian"]

    def _value_and_grad(self, params, data, step, xp):
        weight, bias = params["linear"]["weight"], params["linear"]["bias"]
        theta = xp.concat([xp.reshape(weight, (-1,)), bias])
        residual = theta - data["minimizer"]
        h_residual = xp.reshape(xp.matmul(data["hessian"], xp.reshape(residual, (-1, 1))), (-1,))
        loss = 0.5 * xp.sum(residual * h_residual)
        n_weight = weight.shape[0] * weight.shape[1]
        grads = {
            "linear": {
                "weight": xp.reshape(h_residual[:n_weight], weight.shape),
                "bias": h_residual[n_weight:],
            }
        }
        return loss, grads


class LeastSquares(Problem):
    r"""Linear least squares: :math:`f(W, b) = \frac{1}{2n}\sum_i \lVert W x_i + b - y_i\rVert^2`.

    ``linear/weight`` 3×5, ``linear/bias`` 3; data ``X`` (32×5), ``Y`` (32×3) from a random linear
    model plus noise of standard deviation 0.1; ``batch_size`` 32.
    """

    name = "least_squares"
    description = "linear least squares, 32 examples, weight 3x5 + bias 3"
    batch_size = 32
    default_learning_rate = 1e-2

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        rng = random.Random(seed)
        n, inp, out = 32, 5, 3
        x = _gaussian(rng, (n, inp))
        truth = [[rng.gauss(0.0, 1.0) for _ in range(inp)] for _ in range(out)]
        offset = [rng.gauss(0.0, 1.0) for _ in range(out)]
        y = [
            sum(truth[o][k] * xi[k] for k in range(inp)) + offset[o] + 0.1 * rng.gauss(0.0, 1.0)
            for xi in _rows(x)
            for o in range(out)
        ]
        self._data = {"X": x, "Y": _Values((n, out), y)}
        self._params = {"linear": {"weight": _gaussian(rng, (out, inp), 0.5), "bias": _gaussian(rng, (out,), 0.1)}}

    def _value_and_grad(self, params, data, step, xp):
        x, y = data["X"], data["Y"]
        n = x.shape[0]
        residual = _affine(xp, x, params["linear"]) - y
        loss = 0.5 * xp.sum(residual * residual) / n
        return loss, {"linear": _affine_grads(xp, x, residual / n)}


class Logistic(Problem):
    r"""Multinomial logistic regression (softmax, 3 classes) with an L2 term on the weight.

    .. math:: f(W, b) = \frac1n \sum_i -\log \operatorname{softmax}(W x_i + b)_{y_i}
              + \frac{\lambda}{2}\lVert W\rVert_F^2, \qquad \lambda = 0.01

    ``linear/weight`` 3×5, ``linear/bias`` 3; data ``X`` (48×5) and one-hot ``Y`` (48×3) with
    labels of a random linear teacher plus Gumbel noise; ``batch_size`` 48.
    """

    name = "logistic"
    description = "softmax logistic regression, 48 examples, 3 classes, weight 3x5 + bias 3"
    batch_size = 48
    default_learning_rate = 1e-2
    l2 = 0.01

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        rng = random.Random(seed)
        n, inp, classes = 48, 5, 3
        x = _gaussian(rng, (n, inp))
        labels = _teacher_labels(rng, _rows(x), classes, noise=0.5)
        self._data = {"X": x, "Y": _onehot(labels, classes)}
        self._params = {"linear": {"weight": _gaussian(rng, (classes, inp), 0.3), "bias": _gaussian(rng, (classes,), 0.1)}}

    def _value_and_grad(self, params, data, step, xp):
        weight = params["linear"]["weight"]
        x = data["X"]
        loss, d_logits = _cross_entropy(xp, _affine(xp, x, params["linear"]), data["Y"])
        loss = loss + (0.5 * self.l2) * xp.sum(weight * weight)
        grads = _affine_grads(xp, x, d_logits)
        grads["weight"] = grads["weight"] + self.l2 * weight
        return loss, {"linear": grads}


class OnlineLogistic(Problem):
    r"""An online convex sequence: one logistic loss per step, on a fixed stream of examples.

    .. math:: f_t(w) = \log\bigl(1 + \exp(-y_t\, w^\top x_t)\bigr),
              \quad (x_t, y_t) = (X_{t \bmod T}, y_{t \bmod T})

    ``w`` has 8 entries; the last feature of every :math:`x_t` is 1 (the intercept). The stream
    (``X`` T×8, labels ``y`` ∈ {−1, +1} of length T = ``horizon``, 256 by default) comes from a
    random linear teacher with 10% label noise. ``loss(params, t)`` is the loss suffered at step
    ``t``, as in online convex optimization (the setting of S-AdaGrad's experiments);
    ``batch_size`` 1.
    """

    name = "online"
    description = "online logistic regression: loss f_t on example t of a 256-example stream, w of length 8"
    batch_size = 1
    default_learning_rate = 1e-1

    def __init__(self, seed: int = 0, horizon: int = 256):
        super().__init__(seed)
        if not (isinstance(horizon, int) and horizon >= 1):
            raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
        self.horizon = horizon
        rng = random.Random(seed)
        dim = 8
        rows = [[rng.gauss(0.0, 1.0) for _ in range(dim - 1)] + [1.0] for _ in range(horizon)]
        teacher = [rng.gauss(0.0, 1.0) for _ in range(dim)]
        labels = []
        for x in rows:
            sign = 1.0 if sum(w * xi for w, xi in zip(teacher, x)) >= 0.0 else -1.0
            labels.append(-sign if rng.random() < 0.1 else sign)
        self._data = {"X": _Values((horizon, dim), [v for r in rows for v in r]), "y": _Values((horizon,), labels)}
        self._params = {"w": _Values((dim,), [0.0] * dim)}

    def options(self) -> dict:
        return {"seed": self.seed, "horizon": self.horizon}

    def _value_and_grad(self, params, data, step, xp):
        w = params["w"]
        i = step % self.horizon
        x, y = data["X"][i, :], data["y"][i]
        margin = y * xp.sum(w * x)
        loss = xp.logaddexp(xp.zeros_like(margin), -margin)
        # d/dw log(1 + exp(-m)) = -y x sigmoid(-m); exp may overflow to inf, giving 0, never NaN.
        weight = -y / (1.0 + xp.exp(margin))
        return loss, {"w": weight * x}


class MLP(Problem):
    r"""A two-layer tanh network with softmax cross-entropy.

    .. math:: f = \frac1n\sum_i -\log\operatorname{softmax}\bigl(W_2 \tanh(W_1 x_i + b_1) + b_2\bigr)_{y_i}

    ``fc1`` 16×4 (+16), ``fc2`` 3×16 (+3); data ``X`` (64×4), one-hot ``Y`` (64×3) from a random
    teacher; ``batch_size`` 64.
    """

    name = "mlp"
    description = "MLP 4-16-3 (tanh), softmax cross-entropy, 64 examples"
    batch_size = 64
    default_learning_rate = 1e-2

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        rng = random.Random(seed)
        n, inp, hidden, classes = 64, 4, 16, 3
        x = _gaussian(rng, (n, inp))
        labels = _teacher_labels(rng, [[math.sin(2.0 * v) for v in row] for row in _rows(x)], classes, noise=0.2)
        self._data = {"X": x, "Y": _onehot(labels, classes)}
        self._params = {
            "fc1": {"weight": _gaussian(rng, (hidden, inp), 1.0 / math.sqrt(inp)), "bias": _gaussian(rng, (hidden,), 0.1)},
            "fc2": {"weight": _gaussian(rng, (classes, hidden), 1.0 / math.sqrt(hidden)), "bias": _gaussian(rng, (classes,), 0.1)},
        }

    def _value_and_grad(self, params, data, step, xp):
        x = data["X"]
        hidden = xp.tanh(_affine(xp, x, params["fc1"]))
        loss, d_logits = _cross_entropy(xp, _affine(xp, hidden, params["fc2"]), data["Y"])
        d_hidden = xp.matmul(d_logits, params["fc2"]["weight"]) * (1.0 - hidden * hidden)
        return loss, {"fc1": _affine_grads(xp, x, d_hidden), "fc2": _affine_grads(xp, hidden, d_logits)}


class CNN(Problem):
    r"""A small convolutional network: 3×3 convolution, tanh, linear layer, softmax cross-entropy.

    Input ``X`` (16, 2, 6, 6) (NCHW); ``conv/weight`` (4, 2, 3, 3) and ``conv/bias`` (4), a valid
    stride-1 cross-correlation (as ``torch.nn.functional.conv2d``) giving (16, 4, 4, 4); tanh;
    flattened channel-major to 64 features; ``fc/weight`` (3, 64) and ``fc/bias`` (3); mean
    cross-entropy against one-hot ``Y`` (16×3). ``batch_size`` 16. The convolution is written as
    slices and a matrix product (im2col), so it needs nothing beyond the array API.
    """

    name = "cnn"
    description = "CNN: conv 3x3 (2->4 channels) + tanh + linear, 16 images 6x6, 3 classes"
    batch_size = 16
    default_learning_rate = 1e-2
    _kernel = 3

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        rng = random.Random(seed)
        n, channels, size, filters, classes = 16, 2, 6, 4, 3
        x = _gaussian(rng, (n, channels, size, size))
        per_image = channels * size * size
        images = [x.values[i * per_image : (i + 1) * per_image] for i in range(n)]
        labels = _teacher_labels(rng, images, classes, noise=0.5)
        out = size - self._kernel + 1
        self._data = {"X": x, "Y": _onehot(labels, classes)}
        fan_in = channels * self._kernel**2
        self._params = {
            "conv": {
                "weight": _gaussian(rng, (filters, channels, self._kernel, self._kernel), 1.0 / math.sqrt(fan_in)),
                "bias": _gaussian(rng, (filters,), 0.1),
            },
            "fc": {
                "weight": _gaussian(rng, (classes, filters * out * out), 1.0 / math.sqrt(filters * out * out)),
                "bias": _gaussian(rng, (classes,), 0.1),
            },
        }

    def _patches(self, xp, x):
        """(n, positions, channels·k·k), the columns ordered like the flattened conv weight."""
        n, channels, size, _ = x.shape
        k = self._kernel
        out = size - k + 1
        cols = [
            xp.reshape(x[:, c, i : i + out, j : j + out], (n, out * out))
            for c in range(channels)
            for i in range(k)
            for j in range(k)
        ]
        return xp.stack(cols, axis=2)

    def _value_and_grad(self, params, data, step, xp):
        x = data["X"]
        n = x.shape[0]
        weight = params["conv"]["weight"]
        filters = weight.shape[0]
        patches = self._patches(xp, x)  # (n, p, c·k·k)
        positions = patches.shape[1]
        kernel_matrix = xp.reshape(weight, (filters, -1))
        activation = xp.tanh(xp.matmul(patches, kernel_matrix.mT) + params["conv"]["bias"])  # (n, p, o)
        features = xp.reshape(xp.permute_dims(activation, (0, 2, 1)), (n, filters * positions))
        loss, d_logits = _cross_entropy(xp, _affine(xp, features, params["fc"]), data["Y"])
        d_features = xp.matmul(d_logits, params["fc"]["weight"])
        d_activation = xp.permute_dims(xp.reshape(d_features, (n, filters, positions)), (0, 2, 1))
        d_pre = xp.reshape(d_activation * (1.0 - activation * activation), (n * positions, filters))
        conv_grads = {
            "weight": xp.reshape(xp.matmul(d_pre.mT, xp.reshape(patches, (n * positions, -1))), weight.shape),
            "bias": xp.sum(d_pre, axis=0),
        }
        return loss, {"conv": conv_grads, "fc": _affine_grads(xp, features, d_logits)}


PROBLEMS: dict[str, Callable[..., Problem]] = {
    cls.name: cls for cls in (Quadratic, LeastSquares, Logistic, OnlineLogistic, MLP, CNN)
}


def available_problems() -> list[str]:
    """Names accepted by :func:`get_problem` (and by ``trace --problem``)."""
    return list(PROBLEMS)


def get_problem(problem: "str | Problem", **options: Any) -> Problem:
    """The problem called ``problem`` (a :class:`Problem` passes through unchanged).

    ``options`` go to its constructor (``seed``, and ``condition`` / ``horizon`` where defined).
    An unknown name raises ``ValueError`` listing the valid ones.
    """
    if isinstance(problem, Problem):
        if options:
            raise ValueError("options are only accepted with a problem name")
        return problem
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; available problems: {', '.join(PROBLEMS)}")
    return PROBLEMS[problem](**options)

