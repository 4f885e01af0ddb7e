"""Makes the checkpoint fixtures of IF-Shampoo's per-tile layout (tests/methods/test_if_shampoo_state.py).

Run WITH THE OLD CODE (main b69b61c, the last version that stored one entry per tile,
``tiles/t/factor/n`` and ``tiles/t/factor_momentum/n``, before the tiles' factors became stacks
``stacks/s/factor/n``), e.g.::

    git worktree add --detach /tmp/old b69b61c
    PYTHONPATH=/tmp/old python tests/data/if_shampoo_tiles_make.py tests/data

(an editable install of the new code still provides ``precond_ref.adapters``, which did not change.)
The model, data and steps are those of ``if_shampoo_legacy_make.py``; the blocks are smaller and the
refresh is staggered over three calls (block_size=2, precondition_every=3), so that a group's tiles
of one shape fall into several refresh phases in an irregular order (the ragged (8, 7) group) and in
a regular one that does not divide evenly (the 16 equal tiles of the (8, 8) weight, 16 = 5 * 3 + 1).
Saves ``if_shampoo_tiles_torch.pt`` and ``if_shampoo_tiles_core.npz`` with the contents of the
legacy fixtures of the same names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
# The tests read the model, data and steps from this module, as from the legacy maker.
from if_shampoo_legacy_make import BATCH, K, N0, Tiny, grads, make_core, make_torch, train  # noqa: E402, F401

TORCH_KW = {"principled": dict(block_size=2, precondition_every=3), "faithful": dict(mode="faithful")}
CORE_KW = dict(learning_rate=1e-2, batch_size=BATCH, block_size=2, precondition_every=3, grouping="weight_bias")


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    torch.save(make_torch(TORCH_KW), folder / "if_shampoo_tiles_torch.pt")
    np.savez(folder / "if_shampoo_tiles_core.npz", **make_core(CORE_KW))
