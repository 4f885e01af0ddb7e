"""A character-level transformer language model trained with any precond_ref optimizer (PyTorch).

The text is this project's own documentation (README.md and docs/, no download). Run from the
repository root, after ``pip install -e ".[torch,compare]"``::

    python examples/char_lm_torch.py --optimizer agd --steps 300
    python examples/char_lm_torch.py --optimizer mbf --lr 3e-3 --device cuda

It prints the training and validation loss, shows a progress bar on a terminal, writes the loss
curve to ``--out`` and ends with a sample of generated text.

Each optimizer's default learning rate was chosen by a short measurement (``examples/measure_rates.py``:
100 steps per rate of a half-decade grid on this model, the lowest final loss); the table above
``OPTIMIZERS`` lists what was measured and which rates are still unmeasured starting points.
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
# steps; the lowest marked *). Measured so far (on a shared 2-core CPU):
#   adamw       1e-3: 3.175   3e-3: 2.913  *1e-2: 2.816   3e-2: 2.989
#   agd        *3e-3: 2.838   1e-2: 2.902   3e-2: 3.440
#   dasgo       3e-3: 3.041  *1e-2: 2.862   3e-2: 2.895
#   rf_rmsprop  3e-3: 4.734   1e-2: 4.309   3e-2: 3.713  *0.1: 3.453  (the old default 3e-3 barely trained)
#   rf_adamw    3e-3: 4.751   1e-2: 4.386   3e-2: 3.759  *0.1: 3.464
# (0.1 is the largest rate measured for the root-free two; a larger one may do better still). The
# other rates (asgo, sketchy, s_adagrad, if_shampoo, mbf) are not measured yet: starting points; pass --lr.
OPTIMIZERS = {
    "adamw": (None, 1e-2, False),
    "agd": (pt.AGD, 3e-3, False),
    "asgo": (pt.ASGO, 1e-2, False),
    "dasgo": (pt.DASGO, 1e-2, False),
    "sketchy": (pt.Sketchy, 3e-3, False),
    "s_adagrad": (pt.SAdaGrad, 3e-2, False),
    "rf_rmsprop": (pt.RFRMSProp, 0.1, True),
    "rf_adamw": (pt.RFAdamW, 0.1, True),
    "if_shampoo": (pt.IFShampoo, 3e-3, True),
    "mbf": (pt.MBF, 1e-3, False),
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


def make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    cls, _, _ = OPTIMIZERS[name]
    if cls is None:
        return torch.optim.AdamW(model.parameters(), lr=lr)
    # Named parameters: MBF and IF-Shampoo pair each layer's weight with its bias by name.
    return cls(model.named_parameters(), lr=lr)


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
    optimizer = make_optimizer(args.optimizer, model, lr)
    needs_batch = OPTIMIZERS[args.optimizer][2]
    print(
        f"{len(train_ids)} training / {len(validation_ids)} validation characters, vocabulary {len(vocabulary)}; "
        f"{sum(p.numel() for p in model.parameters())} parameters; {args.optimizer} lr {lr:g}, {args.steps} steps"
    )

    def step_fn(inputs: np.ndarray, targets: np.ndarray) -> float:
        inputs, targets = torch.as_tensor(inputs, device=args.device), torch.as_tensor(targets, device=args.device)
        loss = F.cross_entropy(model(inputs).reshape(-1, len(vocabulary)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step(**({"batch_size": args.batch_size} if needs_batch else {}))
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
