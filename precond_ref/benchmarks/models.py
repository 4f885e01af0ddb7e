"""The end-to-end models of ``bench --model``: a GPT-style transformer and a ResNet-style CNN.

Each model is written twice, as a ``torch.nn.Module`` and as a plain JAX function of a nested dict
of parameters (no Flax: not a dependency). The JAX parameters are the torch module's, converted
leaf by leaf under the same names (``blocks.0.qkv.weight`` becomes
``params["blocks"]["0"]["qkv"]["weight"]``, weights out-first as in torch), so both frameworks
train the same network from the same initial weights, and the core pairs each ``weight`` with its
``bias`` the same way in both. A test checks that the two compute the same loss.

- ``gpt``: token and position embeddings, pre-LayerNorm blocks (causal multi-head attention with a
  fused ``qkv`` projection, a 4x GELU MLP), a final LayerNorm and an untied output head; the loss
  is the mean cross-entropy of next-token prediction on uniformly random tokens.
- ``resnet``: a 3x3 stem, stages of basic residual blocks (two 3x3 convolutions with batch
  normalisation; a strided 1x1 projection where the shape changes), global average pooling and a
  linear classifier, on random images and labels. Batch normalisation uses the batch's statistics
  (training mode); torch also updates its running averages, JAX keeps none (the training step
  does not read them).

Sizes (:data:`SIZES`): ``small`` runs on a 2-core CPU in reasonable time, ``reference`` is the GPU
model of the speed issues (GPT: 6 layers, width 512, vocabulary 8192, batch 16 x 256 tokens;
ResNet: the CIFAR ResNet-18 layout at batch 128), ``tiny`` is for tests. ``gpt2`` (GPT only) has
GPT-2-small's shapes (12 layers, width 768, 12 heads, vocabulary 50257, context 1024) at batch
8 x 1024 tokens, for one large GPU: GPT-2-small's 124.44M parameters plus this model's untied
output head (50257 x 768), 163.04M in all.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

__all__ = ["SIZES", "MODELS", "bench_model", "build_torch", "nest", "jax_loss", "torch_loss", "random_batches", "batch_gradients", "batch_size_of"]

MODELS = ("gpt", "resnet")
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt": {
        "tiny": {"layers": 1, "width": 16, "heads": 2, "vocab": 64, "batch": 2, "seq": 8},
        "small": {"layers": 2, "width": 128, "heads": 4, "vocab": 2048, "batch": 8, "seq": 64},
        "reference": {"layers": 6, "width": 512, "heads": 8, "vocab": 8192, "batch": 16, "seq": 256},
        "gpt2": {"layers": 12, "width": 768, "heads": 12, "vocab": 50257, "batch": 8, "seq": 1024},
    },
    "resnet": {
        "tiny": {"widths": (4, 8), "blocks": 1, "classes": 10, "batch": 4, "image": 8},
        "small": {"widths": (16, 32, 64), "blocks": 1, "classes": 10, "batch": 32, "image": 32},
        "reference": {"widths": (64, 128, 256, 512), "blocks": 2, "classes": 10, "batch": 128, "image": 32},
    },
}
_BATCHES = 2  # distinct random batches the steps cycle through


def batch_size_of(model: str, size: dict) -> int:
    """The number of examples the loss averages (what the root-free methods call B): tokens for the GPT."""
    return size["batch"] * size["seq"] if model == "gpt" else size["batch"]


# ---------------------------------------------------------------------------------------------
# torch


def _torch_classes() -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """Pre-LayerNorm transformer block."""

        def __init__(self, width: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
            x = x + self.proj(y)
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self, layers: int, width: int, heads: int, vocab: int, seq: int, **_: Any) -> None:
            super().__init__()
            self.tok_emb, self.pos_emb = nn.Embedding(vocab, width), nn.Embedding(seq, width)
            self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
            self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.tok_emb(tokens) + self.pos_emb.weight[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.stride = stride
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.shortcut_conv = self.shortcut_bn = None
            if stride != 1 or cin != cout:
                self.shortcut_conv, self.shortcut_bn = nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            skip = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
            return F.relu(y + skip)

    class ResNet(nn.Module):
        def __init__(self, widths: tuple, blocks: int, classes: int, **_: Any) -> None:
            super().__init__()
            self.stem, self.stem_bn = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
            stages, cin = [], widths[0]
            for i, width in enumerate(widths):
                stage = [BasicBlock(cin if j == 0 else width, width, 2 if i > 0 and j == 0 else 1) for j in range(blocks)]
                stages.append(nn.ModuleList(stage))
                cin = width
            self.stages = nn.ModuleList(stages)
            self.fc = nn.Linear(widths[-1], classes)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.stem_bn(self.stem(images)))
            for stage in self.stages:
                for block in stage:
                    x = block(x)
            return self.fc(x.mean(dim=(2, 3)))

    return {"gpt": GPT, "resnet": ResNet, "block": Block}


def build_torch(model: str, size: dict, dtype: Any, device: str, seed: int = 0) -> Any:
    """The torch model with its initial weights (torch's default initialisation, seeded)."""
    import torch

    torch.manual_seed(seed)
    return _torch_classes()[model](**size).to(device=device, dtype=dtype)


def torch_block(width: int, dtype: Any, device: str) -> Any:
    """One GPT block (the layer cases' transformer stacks are made of these)."""
    return _torch_classes()["block"](width, max(1, width // 64)).to(device=device, dtype=dtype)


def torch_loss(model: str) -> Callable[..., Any]:
    import torch.nn.functional as F

    def loss(module: Any, inputs: Any, targets: Any) -> Any:
        logits = module(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return loss


def random_batches(model: str, size: dict, device: str, dtype: Any, seed: int = 1) -> list[tuple[Any, Any]]:
    """``(inputs, targets)`` torch tensors on ``device``: random tokens, or random images and labels."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(_BATCHES):
        if model == "gpt":
            tokens = torch.randint(size["vocab"], (size["batch"], size["seq"] + 1), generator=gen)
            out.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
        else:
            images = torch.randn(size["batch"], 3, size["image"], size["image"], generator=gen, dtype=dtype)
            labels = torch.randint(size["classes"], (size["batch"],), generator=gen)
            out.append((images.to(device), labels.to(device)))
    return out


def batch_gradients(model: str, module: Any, named: list, batches: list, count: int) -> list[list]:
    """The gradients of ``module``'s parameters ``named`` (``(name, parameter)`` pairs) on the first
    ``count`` of ``batches`` (cycled), each a list in ``named``'s order, from a fresh backward pass
    each (``.grad`` cleared first): fixed gradients for timing or counting optimizer steps alone."""
    grads = []
    for i in range(count):
        for _, p in named:
            p.grad = None
        torch_loss(model)(module, *batches[i % len(batches)]).backward()
        grads.append([p.grad.clone() for _, p in named])
    return grads


def fresh_copy(module: Any) -> Any:
    """Every optimizer starts from the same initial weights."""
    return copy.deepcopy(module)


# ---------------------------------------------------------------------------------------------
# JAX


def nest(named: dict) -> dict:
    """``{"a.b.weight": x}`` -> ``{"a": {"b": {"weight": x}}}`` (the torch names as a tree)."""
    tree: dict = {}
    for name, value in named.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _ordered(node: dict) -> list:
    return [node[k] for k in sorted(node, key=int)]


def _linear(p: dict, x: Any) -> Any:
    y = x @ p["weight"].T
    return y + p["bias"] if "bias" in p else y


def _layer_norm(p: dict, x: Any, eps: float = 1e-5) -> Any:
    import jax.numpy as jnp

    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["weight"] + p["bias"]


def _gpt_logits(params: dict, tokens: Any, heads: int) -> Any:
    import jax

    b, t = tokens.shape
    x = params["tok_emb"]["weight"][tokens] + params["pos_emb"]["weight"][:t]
    c = x.shape[-1]
    for block in _ordered(params["blocks"]):
        q, k, v = (_linear(block["qkv"], _layer_norm(block["ln1"], x)).reshape(b, t, 3, heads, c // heads)[:, :, i] for i in range(3))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, c)
        x = x + _linear(block["proj"], y)
        x = x + _linear(block["out"], jax.nn.gelu(_linear(block["fc"], _layer_norm(block["ln2"], x)), approximate=False))
    return _linear(params["head"], _layer_norm(params["ln_f"], x))


def _conv(weight: Any, x: Any, stride: int) -> Any:
    import jax

    pad = weight.shape[-1] // 2
    return jax.lax.conv_general_dilated(
        x, weight, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )


def _batch_norm(p: dict, x: Any, eps: float = 1e-5) -> Any:
    import jax.numpy as jnp

    mean = jnp.mean(x, axis=(0, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(0, 2, 3), keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["weight"][:, None, None] + p["bias"][:, None, None]


def _resnet_logits(params: dict, images: Any) -> Any:
    import jax

    x = jax.nn.relu(_batch_norm(params["stem_bn"], _conv(params["stem"]["weight"], images, 1)))
    for i, stage in enumerate(_ordered(params["stages"])):
        for j, block in enumerate(_ordered(stage)):
            stride = 2 if i > 0 and j == 0 else 1
            y = jax.nn.relu(_batch_norm(block["bn1"], _conv(block["conv1"]["weight"], x, stride)))
            y = _batch_norm(block["bn2"], _conv(block["conv2"]["weight"], y, 1))
            skip = x if "shortcut_conv" not in block else _batch_norm(block["shortcut_bn"], _conv(block["shortcut_conv"]["weight"], x, stride))
            x = jax.nn.relu(y + skip)
    return _linear(params["fc"], x.mean(axis=(2, 3)))


def jax_loss(model: str, size: dict) -> Callable[..., Any]:
    """``loss(params, inputs, targets)``: the mean cross-entropy of the JAX model."""
    import optax

    def loss(params: dict, inputs: Any, targets: Any) -> Any:
        logits = _gpt_logits(params, inputs, size["heads"]) if model == "gpt" else _resnet_logits(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return loss


def parameter_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: str, size: dict, module: Any) -> str:
    count = parameter_count(module)
    if model == "gpt":
        shape = (
            f"{size['layers']} layers, width {size['width']}, {size['heads']} heads, vocabulary {size['vocab']}, "
            f"batch {size['batch']}x{size['seq']} tokens"
        )
    else:
        shape = (
            f"widths {'-'.join(map(str, size['widths']))}, {size['blocks']} block(s) per stage, "
            f"batch {size['batch']} of 3x{size['image']}x{size['image']}"
        )
    return f"{model}: {shape}; {count / 1e6:.2f}M parameters" if count >= 1e5 else f"{model}: {shape}; {count} parameters"



# ---------------------------------------------------------------------------------------------
# The run


def torch_baselines() -> list[tuple[str, Callable[[list], Any]]]:
    import torch

    return [
        ("torch AdamW(fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        ("torch AdamW(foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    ]


def bench_model(
    model: str,
    size: dict,
    contenders: list,
    frameworks: list[str],
    *,
    dtype: str = "float32",
    warmup: int = 2,
    repeats: int = 7,
    budget_s: float = 10.0,
    refresh_windows: bool = True,
    min_window_s: float = 0.0,
    torch_device: str = "cpu",
    torch_compile: str = "default",
    with_authors: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    on_row: Optional[Callable[[dict], None]] = None,
    rounds: int = 1,
    peers: Any = None,
) -> tuple[list[dict], list[str]]:
    """Rows of one model (per framework: its baselines, every contender, the authors' code for
    torch, with ``peers`` the other libraries' optimizers), timing whole training steps, and the
    reasons the authors' (or a peer's) code was skipped."""
    import torch

    from .authors import authors_rows
    from .common import jax_optimizer, torch_optimizer, update_extra, warms_every_pattern
    from .measure import add_ratios, section_rows, timing_for

    tdtype = getattr(torch, dtype)
    initial = build_torch(model, size, tdtype, "cpu")
    batch_size = batch_size_of(model, size)
    timing = timing_for(warmup, repeats, budget_s, refresh_windows, min_window_s)
    rows: list[dict] = []
    skipped: list[str] = []
    for framework in frameworks:
        if framework == "torch":
            torch_measure_ = _torch_measurer(model, size, initial, tdtype, torch_device)
            every_pattern = warms_every_pattern(torch_compile, torch_device)
            torch_timing = timing_for(warmup, repeats, budget_s, refresh_windows, min_window_s, every_pattern)
            baselines = [
                (label, lambda f=factory: torch_measure_(lambda module, named: (f([p for _, p in named]), []), {}, timing(None)))
                for label, factory in torch_baselines()
            ]
            measure = lambda c: torch_measure_(  # noqa: E731
                lambda module, named: torch_optimizer(c, named, torch_compile), update_extra(c, batch_size), torch_timing(c)
            )
        else:
            import optax

            jax_measure_ = _jax_measurer(model, size, initial, dtype)
            baselines = [("optax.adamw (jit)", lambda: jax_measure_(optax.adamw(1e-3), {}, timing(None)))]
            measure = lambda c: jax_measure_(jax_optimizer(c), update_extra(c, batch_size), timing(c))  # noqa: E731
        section = section_rows(framework, baselines, contenders, measure, progress, rounds=rounds, on_row=on_row)
        if framework == "torch" and with_authors:
            authors, skipped = authors_rows(contenders, torch_measure_, batch_size, timing)
            section.extend(authors)
        if framework == "torch" and peers:
            from .peers import peer_rows

            others, notes = peer_rows(torch_measure_, timing, tuple(peers))
            section.extend(others)
            skipped = skipped + notes
        add_ratios(section)
        rows.extend(section)
    return rows, skipped


def _torch_measurer(model: str, size: dict, initial: Any, tdtype: Any, device: str) -> Callable[..., dict]:
    """``measure(make, extra, timing)``: a copy of the initial model, then forward, backward and step."""
    from .measure import torch_measure

    base = fresh_copy(initial).to(device)
    batches = random_batches(model, size, device, tdtype)
    loss_fn = torch_loss(model)

    def measure(make: Callable[[Any, list], tuple[Any, list[str]]], extra: dict, timing: dict) -> dict:
        module = fresh_copy(base)
        named = list(module.named_parameters())

        def set_grads(i: int) -> Any:
            for _, p in named:
                p.grad = None
            loss = loss_fn(module, *batches[i % len(batches)])
            loss.backward()
            return loss.detach()

        return torch_measure(lambda: make(module, named), set_grads, extra, device, timing)

    return measure


def _jax_measurer(model: str, size: dict, initial: Any, dtype: str) -> Callable[..., dict]:
    """``measure(optimizer, extra, timing)``: the jitted training step from the initial weights."""
    import jax.numpy as jnp

    from .measure import jax_measure

    import torch

    jdtype = getattr(jnp, dtype)
    params = nest({name: jnp.asarray(p.detach().cpu().numpy(), dtype=jdtype) for name, p in initial.named_parameters()})
    batches = [(jnp.asarray(x.numpy()), jnp.asarray(y.numpy())) for x, y in random_batches(model, size, "cpu", getattr(torch, dtype))]
    loss_fn = jax_loss(model, size)

    def measure(optimizer: Any, extra: dict, timing: dict) -> dict:
        return jax_measure(optimizer, params, batches, loss_fn, extra, timing)

    return measure
