"""The ``compare`` task: scikit-learn's 8x8 handwritten digits, an MLP, a small CNN and a deep autoencoder.

The data ships inside scikit-learn (no download). The models are written three times over the
same parameter tree, so that every backend trains exactly the same function from the same start:

- NumPy / CuPy: forward *and* backward by hand (:func:`loss_and_grads`), checked against finite
  differences and torch autograd in ``tests/test_compare.py``;
- torch: :func:`torch_loss` (autograd);
- JAX: :func:`jax_loss` (``jax.grad``).

Parameter trees are ``{layer: {"weight": w, "bias": b}}`` in out-first layout (linear ``(out, in)``,
convolution ``(out, in, 3, 3)``), the layout and names the weight/bias pairing of MBF and
IF-Shampoo reads.

- ``"mlp"``: 64 -> 64 (tanh) -> 10.
- ``"cnn"``: 1x8x8 -> conv 3x3 (8 channels, padding 1) -> ReLU -> 2x2 average pool -> conv 3x3
  (16 channels, padding 1) -> ReLU -> 2x2 average pool -> flatten (64) -> linear 10.
- ``"autoencoder"``: 64 -> 64 -> 32 -> 8 -> 32 -> 64 -> 64, tanh hidden layers, a linear 8-unit
  code layer and a logistic output: the deep autoencoder of Hinton & Salakhutdinov (Science
  2006) that the K-FAC family (Martens & Grosse 2015; MBF's own MLP experiments) trains on MNIST,
  scaled to 8x8 images.

The classifiers' loss is the cross-entropy averaged over the mini-batch; the autoencoder's is the
squared reconstruction error summed over the 64 pixels and averaged over the mini-batch (the
per-case error the K-FAC papers report). The labels are ignored by the autoencoder.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np

from .methods import CLASSIFIERS, MODELS

__all__ = [
    "MODELS", "CLASSIFIERS", "load_digits_split", "validation_split", "init_params", "loss_and_grads", "predict", "evaluate",
    "torch_loss", "jax_loss",
]

_HIDDEN = 64
_CONV1, _CONV2 = 8, 16
# Dense chains: (layer name, fan-out, activation) from the 64 input pixels on.
_DENSE = {
    "mlp": (("fc1", _HIDDEN, "tanh"), ("fc2", 10, None)),
    "autoencoder": (
        ("enc1", 64, "tanh"), ("enc2", 32, "tanh"), ("code", 8, None),
        ("dec1", 32, "tanh"), ("dec2", 64, "tanh"), ("out", 64, "sigmoid"),
    ),
}


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)``: pixels scaled to [0, 1], a stratified split.

    The split is fixed (``split_seed``) so that runs with different training seeds see the same
    data. ``x`` has shape ``(n, 64)`` in float64, ``y`` int64 labels 0-9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def validation_split(x: np.ndarray, y: np.ndarray, fraction: float, split_seed: int = 1) -> tuple[np.ndarray, ...]:
    """``(x_fit, y_fit, x_validation, y_validation)``: a stratified split of the training set.

    The learning-rate sweep trains on the first part and scores the second, so the test set is
    never seen while tuning.
    """
    from sklearn.model_selection import train_test_split

    x_fit, x_val, y_fit, y_val = train_test_split(x, y, test_size=fraction, random_state=split_seed, stratify=y)
    return x_fit, y_fit, x_val, y_val


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    # torch.nn's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape)


def init_params(model: str, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Initial parameters (float64 NumPy) of ``model``; every backend starts from these."""
    rng = np.random.default_rng(seed)
    if model in _DENSE:
        layers, fan_in = {}, 64
        for name, fan_out, _ in _DENSE[model]:
            layers[name] = ((fan_out, fan_in), fan_in)
            fan_in = fan_out
    elif model == "cnn":
        layers = {
            "conv1": ((_CONV1, 1, 3, 3), 9),
            "conv2": ((_CONV2, _CONV1, 3, 3), 9 * _CONV1),
            "fc": ((10, _CONV2 * 4), _CONV2 * 4),
        }
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    return {
        name: {"weight": _uniform(rng, shape, fan_in), "bias": _uniform(rng, shape[:1], fan_in)}
        for name, (shape, fan_in) in layers.items()
    }


# ---------------------------------------------------------------------------------------------
# NumPy / CuPy: forward and backward by hand. ``xp`` is the numpy or cupy module.


# The CNN's images are tiny (8x8, then 4x4), where im2col's many small copies cost more than the
# arithmetic. The first convolution (one input channel) is a single gather of the 3x3 patches and
# a (B*64, 9) x (9, 8) product; its activations stay position-major ``(B, y, x, channel)`` through
# the pooling. The second convolution is one product with the dense (256, 128) matrix of the linear map it
# is, filled from the 3x3 weights (measured against im2col: docs/compare.md).


@functools.lru_cache(maxsize=None)
def _patches(size: int) -> np.ndarray:
    """``(size*size, 9)`` indices of the 3x3 neighbourhood of each pixel in a flat image with one
    zero appended at index ``size*size`` (the zero padding)."""
    y, x, ki, kj = np.meshgrid(*(np.arange(n) for n in (size, size, 3, 3)), indexing="ij")
    src_y, src_x = y + ki - 1, x + kj - 1
    inside = (src_y >= 0) & (src_y < size) & (src_x >= 0) & (src_x < size)
    return np.where(inside, src_y * size + src_x, size * size).reshape(size * size, 9)


@functools.lru_cache(maxsize=None)
def _conv_layout(channels_in: int, channels_out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index maps between a 3x3 weight (zero padding 1) and the dense matrix of its convolution.

    The matrix has rows ``(out, y, x)`` (channel-major, the layout of the next layer's input) and
    columns ``(y, x, in)`` (position-major, the layout of the pooled first convolution). Returns
    ``(cells, taps, gather)``: ``dense.flat[cells] = weight.flat[taps]`` builds it; ``gather`` has
    shape ``(weight.size, size*size)`` and lists, for every weight, the cells it fills, or
    ``dense.size`` (one past the end, where a zero is appended) where the window leaves the image.
    """
    o, c, ki, kj, y, x = np.meshgrid(*(np.arange(n) for n in (channels_out, channels_in, 3, 3, size, size)), indexing="ij")
    src_y, src_x = y + ki - 1, x + kj - 1
    inside = (src_y >= 0) & (src_y < size) & (src_x >= 0) & (src_x < size)
    rows = (o * size + y) * size + x
    cols = (src_y * size + src_x) * channels_in + c
    cells = rows * (channels_in * size * size) + cols
    gather = np.where(inside, cells, channels_out * channels_in * size**4).reshape(-1, size * size)
    taps = np.broadcast_to(np.arange(channels_out * channels_in * 9).reshape(o.shape[:4] + (1, 1)), o.shape)
    return cells[inside], taps[inside], gather


def _append_zero(xp: Any, x: Any) -> Any:
    """``x`` with a zero appended along its last axis (the target of out-of-image indices)."""
    return xp.concatenate([x, xp.zeros(x.shape[:-1] + (1,), dtype=x.dtype)], axis=-1)


def _conv1_forward(xp: Any, x: Any, weight: Any, bias: Any) -> tuple[Any, Any]:
    """(B, 64) images -> position-major pre-activations (B*64, channels) and the patches."""
    patches = _append_zero(xp, x)[:, xp.asarray(_patches(8))].reshape(-1, 9)
    return xp.matmul(patches, weight.reshape(weight.shape[0], 9).T) + bias, patches


def _conv1_backward(xp: Any, dout: Any, patches: Any, weight: Any) -> tuple[Any, Any]:
    """Weight and bias gradients from position-major ``dout`` (B*64, channels)."""
    return xp.matmul(dout.T, patches).reshape(weight.shape), dout.sum(axis=0)


def _conv2_matrix(xp: Any, weight: Any) -> Any:
    channels_out, channels_in = weight.shape[:2]
    cells, taps, _ = _conv_layout(channels_in, channels_out, 4)
    dense = xp.zeros(channels_out * channels_in * 16 * 16, dtype=weight.dtype)
    dense[xp.asarray(cells)] = weight.reshape(-1)[xp.asarray(taps)]
    return dense.reshape(channels_out * 16, channels_in * 16)


def _conv2_weight_grad(xp: Any, dout: Any, x: Any, weight: Any) -> Any:
    _, _, gather = _conv_layout(weight.shape[1], weight.shape[0], 4)
    ddense = _append_zero(xp, xp.matmul(dout.T, x).reshape(-1))
    return ddense[xp.asarray(gather)].sum(axis=1).reshape(weight.shape)


def _pool(x: Any, half: int, inner: int) -> Any:
    """2x2 average pooling of flat activations laid out as ``(outer, 2*half rows, 2*half cols, inner)``.

    ``inner`` is the channel count for position-major activations and 1 for channel-major ones.
    Sums of strided views, which NumPy runs faster than ``mean`` over two non-adjacent axes
    (docs/compare.md).
    """
    window = x.reshape(-1, 2, half, 2, inner)
    rows = window[:, 0] + window[:, 1]
    return ((rows[:, :, 0] + rows[:, :, 1]) * 0.25).reshape(x.shape[0], -1)


def _pool_backward(xp: Any, dout: Any, half: int, inner: int) -> Any:
    n = dout.size // (half * inner)
    spread = xp.broadcast_to(dout.reshape(n, 1, half, 1, inner) * 0.25, (n, 2, half, 2, inner))
    return spread.reshape(dout.shape[0], -1)


def _cross_entropy(xp: Any, logits: Any, labels: Any) -> tuple[Any, Any]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_z
    n = logits.shape[0]
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].mean()
    dlogits = xp.exp(log_probs)
    dlogits[rows, labels] -= 1.0
    return loss, dlogits / n


def _sigmoid(xp: Any, z: Any) -> Any:
    # 1/(1+exp(-z)) overflows for z << 0; the tanh form is the same function without overflow.
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def _squared_error(xp: Any, output: Any, target: Any) -> tuple[Any, Any]:
    """Reconstruction error summed over pixels, averaged over the batch, and its output gradient."""
    residual = output - target
    n = output.shape[0]
    return (residual * residual).sum() / n, 2.0 * residual / n


def _forward(xp: Any, model: str, params: dict, x: Any, keep: bool) -> tuple[Any, dict]:
    """Logits (classifiers) or reconstructions (autoencoder), and what the backward pass needs."""
    cache: dict = {}
    if model in _DENSE:
        inputs, activation = [], x
        for name, _, kind in _DENSE[model]:
            inputs.append(activation)
            pre = xp.matmul(activation, params[name]["weight"].T) + params[name]["bias"]
            activation = pre if kind is None else xp.tanh(pre) if kind == "tanh" else _sigmoid(xp, pre)
        cache.update(inputs=inputs)
        return activation, cache
    batch = x.shape[0]
    pre1, patches = _conv1_forward(xp, x, params["conv1"]["weight"], params["conv1"]["bias"])
    pooled1 = _pool(xp.maximum(pre1, 0.0).reshape(batch, -1), 4, _CONV1)
    dense2 = _conv2_matrix(xp, params["conv2"]["weight"])
    pre2 = (xp.matmul(pooled1, dense2.T).reshape(batch, _CONV2, 16) + params["conv2"]["bias"][:, None]).reshape(batch, -1)
    features = _pool(xp.maximum(pre2, 0.0), 2, 1)
    if keep:
        cache.update(pre1=pre1, patches=patches, pooled1=pooled1, dense2=dense2, pre2=pre2, features=features)
    fc = params["fc"]
    return xp.matmul(features, fc["weight"].T) + fc["bias"], cache


def predict(xp: Any, model: str, params: dict, x: Any) -> Any:
    """Logits (classifiers) or reconstructions (autoencoder) of ``model`` on ``x`` (shape ``(n, 64)``)."""
    return _forward(xp, model, params, x, keep=False)[0]


def evaluate(xp: Any, model: str, params: dict, x: Any, labels: Any) -> tuple[float, Optional[float]]:
    """``(loss, accuracy)`` on a data set; the accuracy is ``None`` for the autoencoder."""
    output = predict(xp, model, params, x)
    if model in CLASSIFIERS:
        loss, _ = _cross_entropy(xp, output, labels)
        return float(loss), float((output.argmax(axis=1) == labels).mean())
    return float(_squared_error(xp, output, x)[0]), None


def loss_and_grads(xp: Any, model: str, params: dict, x: Any, labels: Any) -> tuple[Any, dict]:
    """The loss of ``model`` on a batch and its gradient tree (same structure as ``params``)."""
    output, cache = _forward(xp, model, params, x, keep=True)
    if model in CLASSIFIERS:
        loss, doutput = _cross_entropy(xp, output, labels)
    else:
        loss, doutput = _squared_error(xp, output, x)
    if model in _DENSE:
        grads, dactivation, activation = {}, doutput, output
        for (name, _, kind), inputs in zip(reversed(_DENSE[model]), reversed(cache["inputs"])):
            # d pre-activation from d activation, with the activation's derivative written in its output.
            if kind == "tanh":
                dpre = dactivation * (1.0 - activation * activation)
            elif kind == "sigmoid":
                dpre = dactivation * activation * (1.0 - activation)
            else:
                dpre = dactivation
            grads[name] = {"weight": xp.matmul(dpre.T, inputs), "bias": dpre.sum(axis=0)}
            if inputs is not x:  # no gradient for the input pixels
                dactivation, activation = xp.matmul(dpre, params[name]["weight"]), inputs
        return loss, {name: grads[name] for name in params}
    dlogits = doutput
    fc = params["fc"]
    grads = {"fc": {"weight": xp.matmul(dlogits.T, cache["features"]), "bias": dlogits.sum(axis=0)}}
    dfeatures = xp.matmul(dlogits, fc["weight"])
    batch = x.shape[0]
    dpre2 = _pool_backward(xp, dfeatures, 2, 1) * (cache["pre2"] > 0)
    dw2 = _conv2_weight_grad(xp, dpre2, cache["pooled1"], params["conv2"]["weight"])
    db2 = dpre2.reshape(batch, _CONV2, 16).sum(axis=(0, 2))
    dpooled1 = xp.matmul(dpre2, cache["dense2"])
    dpre1 = _pool_backward(xp, dpooled1, 4, _CONV1).reshape(-1, _CONV1) * (cache["pre1"] > 0)
    dw1, db1 = _conv1_backward(xp, dpre1, cache["patches"], params["conv1"]["weight"])
    grads["conv1"] = {"weight": dw1, "bias": db1}
    grads["conv2"] = {"weight": dw2, "bias": db2}
    return loss, {name: grads[name] for name in params}


# ---------------------------------------------------------------------------------------------
# torch and JAX: the same functions, differentiated by the frameworks.


def torch_logits(model: str, params: dict, x: Any) -> Any:
    """Logits (or reconstructions) with torch; ``params`` maps ``"layer.weight"`` / ``"layer.bias"`` to tensors."""
    import torch
    import torch.nn.functional as F

    if model in _DENSE:
        activation = x
        for name, _, kind in _DENSE[model]:
            pre = F.linear(activation, params[f"{name}.weight"], params[f"{name}.bias"])
            activation = pre if kind is None else torch.tanh(pre) if kind == "tanh" else 0.5 * (1.0 + torch.tanh(0.5 * pre))
        return activation
    images = x.reshape(x.shape[0], 1, 8, 8)
    act1 = F.avg_pool2d(F.relu(F.conv2d(images, params["conv1.weight"], params["conv1.bias"], padding=1)), 2)
    act2 = F.avg_pool2d(F.relu(F.conv2d(act1, params["conv2.weight"], params["conv2.bias"], padding=1)), 2)
    return F.linear(act2.reshape(x.shape[0], -1), params["fc.weight"], params["fc.bias"])


def torch_loss(model: str, params: dict, x: Any, labels: Any) -> Any:
    import torch.nn.functional as F

    output = torch_logits(model, params, x)
    if model in CLASSIFIERS:
        return F.cross_entropy(output, labels)
    return ((output - x) ** 2).sum() / x.shape[0]


def jax_logits(model: str, params: dict, x: Any) -> Any:
    """Logits with JAX; ``params`` is the nested ``{layer: {"weight", "bias"}}`` tree."""
    import jax
    import jax.numpy as jnp

    def conv(images: Any, layer: dict) -> Any:
        out = jax.lax.conv_general_dilated(
            images, layer["weight"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return out + layer["bias"][None, :, None, None]

    def pool(a: Any) -> Any:
        b, c, h, w = a.shape
        return a.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))

    if model in _DENSE:
        activation = x
        for name, _, kind in _DENSE[model]:
            pre = activation @ params[name]["weight"].T + params[name]["bias"]
            activation = pre if kind is None else jnp.tanh(pre) if kind == "tanh" else 0.5 * (1.0 + jnp.tanh(0.5 * pre))
        return activation
    images = x.reshape(x.shape[0], 1, 8, 8)
    act1 = pool(jax.nn.relu(conv(images, params["conv1"])))
    act2 = pool(jax.nn.relu(conv(act1, params["conv2"])))
    return act2.reshape(x.shape[0], -1) @ params["fc"]["weight"].T + params["fc"]["bias"]


def jax_loss(model: str, params: dict, x: Any, labels: Any) -> Any:
    import jax
    import jax.numpy as jnp

    output = jax_logits(model, params, x)
    if model not in CLASSIFIERS:
        return jnp.sum((output - x) ** 2) / x.shape[0]
    log_probs = jax.nn.log_softmax(output, axis=1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
