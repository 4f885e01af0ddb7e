"""A character-level transformer language model trained with any precond_ref optimizer (PyTorch).

The text is this project's own documentation (README.md and docs/, no download). Run from the
repository root, after ``pip install -e ".[torch,compare]"``::

    python examples/char_lm_torch.py --optimizer agd --steps 300
    python examples/char_lm_torch.py --optimizer mbf --lr 3e-3 --device cuda

It prints the training and validation loss, shows a progress bar on a terminal, writes the loss
curve to ``--out`` and ends with a sample of generated text.

Each optimizer's default learning rate was chosen by a short measurement (``examples/measure_rates.py``:
100 steps per rate of a half-decade grid on this model, extended until the lowest final loss is
inside it); the table above ``OPTIMIZERS`` lists what was measured.

Batch size: the root-free methods (RF-RMSProp, RF-AdamW, IF-Shampoo) get ``batch_size`` =
``--batch-size``, the sequences of a batch, not the ``--batch-size`` x ``--context`` tokens that this
per-token loss averages over (the library's B). Their statistic B*g*g is thus divided by the context
length, and their default learning rates were tuned with that B.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import batches, load_corpus, parse_arguments, report, train_loop  # noqa: E402

from precond_ref.adapters import torch as pt  # noqa: E402

# name -> (torch class, default learning rate, whether step() needs the batch size).
# The default rates come from a short measurement, `python examples/measure_rates.py --example torch
# --steps 100` (this example's default model, seed 0, 100 steps per rate, the mean loss of the last 20
# steps; the lowest marked *), the grid extended past an end until the lowest is inside it (a loss in
# the tens or hundreds: the run blew up). Measured on a shared 2-core CPU with each class's keyword
# defaults as they were then (the script prints them), today's except that ASGO's roots and Sketchy's
# sketches were refreshed at every step (`precondition_every=1`; now every 2 and 3 steps, spread),
# IF-Shampoo's factors were float32 and dense on whole axes, vectors' too (now bf16, axes cut into
# blocks of 64, diagonal for vectors), and MBF inverted whole FC output axes, all on one step (now
# blocks of 128, refreshed in 10 shares); the text was the README and docs/ of the time, and other
# docs give slightly different losses.
#   adamw       3e-3: 2.895  *1e-2: 2.795   3e-2: 2.996
#   agd         1e-3: 2.875  *3e-3: 2.816   1e-2: 2.823   3e-2: 3.466
#   asgo        1e-3: 3.679   3e-3: 3.043   1e-2: 2.788  *3e-2: 2.748   0.1: 2.862
#   dasgo       3e-3: 3.037  *1e-2: 2.853   3e-2: 2.866
#   sketchy     1e-4: 2.744  *3e-4: 2.712   1e-3: 3.128   3e-3: 3.540   1e-2: 63.261   3e-2: 702.303
#   s_adagrad   1e-3: 4.893   3e-3: 4.789   1e-2: 4.241   3e-2: 3.594   0.1: 3.157  *0.3: 2.948   1: 3.281   3: 8.522
#   rf_rmsprop  3e-3: 4.770   1e-2: 4.338   3e-2: 3.704   0.1: 3.432   0.3: 3.267  *1: 3.092   3: 28.772
#   rf_adamw    3e-3: 4.787   1e-2: 4.417   3e-2: 3.754   0.1: 3.442   0.3: 3.274   1: 3.078  *3: 2.937   10: 255.694
#   if_shampoo  1e-3: 4.400   3e-3: 3.739   1e-2: 3.436   3e-2: 3.268   0.1: 3.070   0.3: 2.933  *1: 2.869   3: 2.891
#   mbf         1e-3: 2.911   3e-3: 2.882  *1e-2: 2.867   3e-2: 2.909
# The root-free two train best one half-decade below a rate that blows up: a different
# seed or model may need a smaller --lr.
OPTIMIZERS = {
    "adamw": (None, 1e-2, False),
    "agd": (pt.AGD, 3e-3, False),
    "asgo": (pt.ASGO, 3e-2, False),
    "dasgo": (pt.DASGO, 1e-2, False),
    "sketchy": (pt.Sketchy, 3e-4, False),
    "s_adagrad": (pt.SAdaGrad, 0.3, False),
    "rf_rmsprop": (pt.RFRMSProp, 1.0, True),
    "rf_adamw": (pt.RFAdamW, 3.0, True),
    "if_shampoo": (pt.IFShampoo, 1.0, True),
    "mbf": (pt.MBF, 1e-2, False),
}


class CharTransformer(torch.nn.Module):
    """Token and position embeddings, pre-norm causal transformer blocks, a linear read-out."""

    def __init__(self, vocabulary: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.token = torch.nn.Embedding(vocabulary, width)
        self.position = torch.nn.Embedding(context, width)
        block = torch.nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocabulary)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        hidden = self.blocks(self.token(ids) + self.position(positions), mask=mask, is_causal=True)
        return self.head(self.norm(hidden))


def check_device(text: str) -> None:
    """Exit with a one-line message (status 2, like ``compare --device``) when ``--device`` is not usable here."""

    def fail(message: str) -> None:
        print(f"char_lm_torch.py: --device {text}: {message}", file=sys.stderr)
        raise SystemExit(2)

    try:
        device = torch.device(text)
    except RuntimeError as err:
        fail(f"not a torch device ({err})")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("needs CUDA, and torch.cuda.is_available() is False on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail("torch.backends.mps.is_available() is False on this machine")


def make_optimizer(name: str, model: torch.nn.Module, lr: float, batch_size: int) -> torch.optim.Optimizer:
    cls, _, needs_batch = OPTIMIZERS[name]
    if cls is None:
        return torch.optim.AdamW(model.parameters(), lr=lr)
    # Named parameters: MBF and IF-Shampoo pair each layer's weight with its bias by name.
    # B, the number of examples the loss averages over, is by the library's definition the
    # batch_size x context tokens of this per-token loss; this example gives the root-free methods the
    # batch_size sequences instead, which divides their statistic B*g*g by the context length, and its
    # learning rates (OPTIMIZERS) were tuned with that B. Giving batch_size * context follows the
    # definition and needs rates tuned for it.
    return cls(model.named_parameters(), lr=lr, **({"batch_size": batch_size} if needs_batch else {}))


@torch.no_grad()
def sample(model: CharTransformer, vocabulary: list[str], prompt: str, length: int, context: int, device: str) -> str:
    lookup = {ch: i for i, ch in enumerate(vocabulary)}
    ids = torch.tensor([[lookup.get(ch, 0) for ch in prompt]], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(length):
        logits = model(ids[:, -context:])[0, -1]
        ids = torch.cat([ids, torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[None]], dim=1)
    return "".join(vocabulary[i] for i in ids[0].tolist())


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(
        __doc__.split("\n\n")[0], OPTIMIZERS, argv,
        lambda parser: parser.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)"),
    )

    check_device(args.device)
    torch.manual_seed(args.seed)
    train_ids, validation_ids, vocabulary = load_corpus()
    model = CharTransformer(len(vocabulary), args.context, args.width, args.layers, args.heads).to(args.device)
    lr = args.lr if args.lr is not None else OPTIMIZERS[args.optimizer][1]
    optimizer = make_optimizer(args.optimizer, model, lr, args.batch_size)
    print(
        f"{len(train_ids)} training / {len(validation_ids)} validation characters, vocabulary {len(vocabulary)}; "
        f"{sum(p.numel() for p in model.parameters())} parameters; {args.optimizer} lr {lr:g}, {args.steps} steps"
    )

    def step_fn(inputs: np.ndarray, targets: np.ndarray) -> float:
        inputs, targets = torch.as_tensor(inputs, device=args.device), torch.as_tensor(targets, device=args.device)
        loss = F.cross_entropy(model(inputs).reshape(-1, len(vocabulary)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    data = batches(train_ids, args.batch_size, args.context, args.seed)
    steps, losses, elapsed = train_loop(step_fn, data, args.steps, args.optimizer)
    model.eval()
    with torch.no_grad():
        validation = batches(validation_ids, args.batch_size, args.context, args.seed + 1)
        held_out = [
            F.cross_entropy(model(torch.as_tensor(x, device=args.device)).reshape(-1, len(vocabulary)),
                            torch.as_tensor(y, device=args.device).reshape(-1)).item()
            for x, y in (next(validation) for _ in range(8))
        ]
    validation_loss = float(np.mean(held_out))
    report(
        steps, losses, elapsed, validation_loss, args.out, f"char_lm_torch_{args.optimizer}",
        f"char transformer (PyTorch), {args.optimizer} lr {lr:g}",
    )
    if args.sample:
        print("sample:\n" + sample(model, vocabulary, "The ", args.sample, args.context, args.device))
    return {"losses": losses, "validation_loss": validation_loss}


if __name__ == "__main__":
    main()
