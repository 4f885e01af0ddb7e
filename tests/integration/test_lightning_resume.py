"""Lightning ``Trainer.fit(ckpt_path=...)`` with our optimizer from ``configure_optimizers``.

Invariant: a fit stopped after 2 epochs, saved with ``trainer.save_checkpoint`` and resumed by a
new ``Trainer.fit(ckpt_path=...)`` for 4 epochs takes the uninterrupted 4-epoch fit's last steps:
the same losses and the same final parameters, bit for bit. The checkpoint is taken at an
epoch's end (a plain DataLoader cannot resume mid-epoch), after 4 of the 8 steps, and the
unshuffled data makes every epoch's batches the same.
"""

from __future__ import annotations

import pytest
import torch
from framework_cases import (
    REPRESENTATIVE,
    assert_same_parameters,
    batches,
    make_mlp,
    make_optimizer,
    parameters,
)


# Lightning's advice (resumable data loaders, worker counts) and its own deprecated calls into torch.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec.*is deprecated")


def _module_class():
    """The LightningModule of these tests. Lightning is imported here, by the tests that use it,
    not when the file is collected: every xdist worker collects every file, and importing
    Lightning is the costliest import of the collection. Skips the test where it is missing."""
    L = pytest.importorskip("lightning")

    class _Module(L.LightningModule):
        def __init__(self, name, scheduler):
            super().__init__()
            self.net = make_mlp()
            self.name, self.scheduler, self.losses = name, scheduler, []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = make_optimizer(self.name, self.net.named_parameters())
            if not self.scheduler:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return L, _Module


def _fit(lightning, name, scheduler, root, epochs, ckpt_path=None):
    L, module_class = lightning
    module = module_class(name, scheduler)
    x, y = (torch.cat(t) for t in zip(*batches(2)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)
    trainer = L.Trainer(
        default_root_dir=str(root), max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # not deterministic=True: it would switch on torch's deterministic algorithms for the whole worker
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module


def _check(name, scheduler, tmp_path):
    lightning = _module_class()
    _, full = _fit(lightning, name, scheduler, tmp_path, epochs=4)
    half_trainer, _ = _fit(lightning, name, scheduler, tmp_path, epochs=2)
    half_trainer.save_checkpoint(tmp_path / "half.ckpt")
    _, resumed = _fit(lightning, name, scheduler, tmp_path, epochs=4, ckpt_path=str(tmp_path / "half.ckpt"))
    assert len(full.losses) == 8
    assert resumed.losses == full.losses[4:]
    assert_same_parameters(parameters(full), parameters(resumed))


@pytest.mark.parametrize("scheduler", [False, True], ids=["no-scheduler", "scheduler"])
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_fit_ckpt_path_resume_continues_exactly(name, scheduler, tmp_path):
    _check(name, scheduler=scheduler, tmp_path=tmp_path)
