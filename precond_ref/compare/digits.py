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


def _im2col(xp: Any, x: Any) -> Any:
    """(B, C, H, W) -> (B, C*9, H*W): the 3x3 neighbourhoods (zero padding 1), channel-major."""
    b, c, h, w = x.shape
    padded = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = xp.stack([padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=2)
    return cols.reshape(b, c * 9, h * w)


def _col2im(xp: Any, dcols: Any, shape: tuple[int, ...]) -> Any:
    """Adjoint of :func:`_im2col`: scatter-add the neighbourhood gradients back to pixels."""
    b, c, h, w = shape
    d = dcols.reshape(b, c, 3, 3, h, w)
    padded = xp.zeros((b, c, h + 2, w + 2), dtype=dcols.dtype)
    for i in range(3):
        for j in range(3):
            padded[:, :, i : i + h, j : j + w] += d[:, :, i, j]
    return padded[:, :, 1 : h + 1, 1 : w + 1]


def _conv_forward(xp: Any, x: Any, weight: Any, bias: Any) -> tuple[Any, Any]:
    b, _, h, w = x.shape
    cols = _im2col(xp, x)
    out = xp.matmul(weight.reshape(weight.shape[0], -1), cols) + bias[:, None]
    return out.reshape(b, weight.shape[0], h, w), cols


def _conv_backward(
    xp: Any, dout: Any, cols: Any, weight: Any, x_shape: Optional[tuple[int, ...]]
) -> tuple[Any, Any, Any]:
    """Gradients of the input (None when ``x_shape`` is None), the weight and the bias."""
    b, o, h, w = dout.shape
    dout = dout.reshape(b, o, h * w)
    # Sum over the batch and positions as one matrix product (tensordot is ~10x slower here).
    dout_rows = xp.ascontiguousarray(dout.transpose(1, 0, 2)).reshape(o, -1)
    cols_rows = xp.ascontiguousarray(cols.transpose(1, 0, 2)).reshape(cols.shape[1], -1)
    dweight = xp.matmul(dout_rows, cols_rows.T).reshape(weight.shape)
    dbias = dout.sum(axis=(0, 2))
    if x_shape is None:
        return None, dweight, dbias
    dcols = xp.matmul(weight.reshape(o, -1).T, dout)
    return _col2im(xp, dcols, x_shape), dweight, dbias


def _pool(x: Any) -> Any:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def _pool_backward(xp: Any, dout: Any) -> Any:
    return xp.repeat(xp.repeat(dout, 2, axis=2), 2, axis=3) / 4.0


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
    images = x.reshape(x.shape[0], 1, 8, 8)
    pre1, cols1 = _conv_forward(xp, images, params["conv1"]["weight"], params["conv1"]["bias"])
    act1 = xp.maximum(pre1, 0.0)
    pooled1 = _pool(act1)
    pre2, cols2 = _conv_forward(xp, pooled1, params["conv2"]["weight"], params["conv2"]["bias"])
    act2 = xp.maximum(pre2, 0.0)
    features = _pool(act2).reshape(x.shape[0], -1)
    if keep:
        cache.update(images=images, pre1=pre1, cols1=cols1, pooled1=pooled1, pre2=pre2, cols2=cols2, features=features)
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
    dact2 = _pool_backward(xp, dfeatures.reshape(x.shape[0], _CONV2, 2, 2))
    dpre2 = dact2 * (cache["pre2"] > 0)
    dpooled1, dw2, db2 = _conv_backward(xp, dpre2, cache["cols2"], params["conv2"]["weight"], cache["pooled1"].shape)
    dact1 = _pool_backward(xp, dpooled1)
    dpre1 = dact1 * (cache["pre1"] > 0)
    _, dw1, db1 = _conv_backward(xp, dpre1, cache["cols1"], params["conv1"]["weight"], None)
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
