"""transformers ``Trainer`` with our optimizer and a scheduler, resumed from its own checkpoint.

Invariant: ``Trainer.train(resume_from_checkpoint=...)`` restores the model, the optimizer's
``state_dict``, the scheduler, the RNG states and the data position, so the steps after the
checkpoint are the uninterrupted run's steps: the same losses and the same final parameters,
bit for bit (the same arithmetic on the same values). The model is a one-layer Llama built
from a config (random weights, no download); Llama's ``nn.Linear`` layers are outputs-first, as
MBF's pairing expects (GPT-2's ``Conv1D`` is not).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from framework_cases import REPRESENTATIVE, assert_same_parameters, make_optimizer, parameters  # noqa: E402

STEPS, SAVE_AT = 6, 3


class _Tokens(torch.utils.data.Dataset):
    """24 fixed sequences of 8 tokens from a vocabulary of 32 (labels = inputs: causal LM)."""

    def __init__(self):
        self.ids = torch.randint(0, 32, (24, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int64)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(name, out, resume=None):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    opt = make_optimizer(name, model.named_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + step))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=SAVE_AT, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    losses = []

    class Recording(transformers.Trainer):
        # The logged loss is rounded to 4 digits: record the exact one.
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            losses.append((result[0] if return_outputs else result).item())
            return result

    Recording(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched)).train(
        resume_from_checkpoint=resume
    )
    return losses, parameters(model)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_trainer_resume_from_checkpoint_continues_exactly(name, tmp_path):
    full, full_params = _train(name, tmp_path / "full")
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert checkpoint.is_dir()
    resumed, resumed_params = _train(name, tmp_path / "resumed", resume=str(checkpoint))
    assert len(full) == STEPS
    assert resumed == full[SAVE_AT:]
    assert_same_parameters(full_params, resumed_params)
