"""An unknown keyword given to an optimizer class or factory, named with the closest valid one.

Python's own error (``got an unexpected keyword argument 'learning_rate'``) names neither the
optimizer nor what it takes instead; the torch classes say ``lr`` and the optax factories
``learning_rate``, and a user coming from the other framework types the other one.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Mapping

__all__ = ["check_keywords"]

#: Names of one hyperparameter in other conventions (torch.optim's, optax's, the papers'), for the
#: suggestion when spelling alone does not find it.
_SYNONYMS = {
    "lr": ("learning_rate", "step_size", "eta"),
    "learning_rate": ("lr", "step_size", "eta"),
    "betas": ("b1", "b2", "beta1", "beta2", "beta_1", "beta_2"),
    "b1": ("beta1", "beta_1", "betas"),
    "b2": ("beta2", "beta_2"),
    "eps": ("epsilon",),
    "weight_decay": ("wd", "decay"),
}


#: What to do instead, for options of torch.optim's classes that a signature does not take: the
#: optax factories minimise (torch's ``maximize`` has no optax counterpart), and each method has one
#: implementation (no ``foreach``/``fused`` variants).
_INSTEAD = {
    "maximize": "optax transformations minimise: negate the loss, or put optax.scale(-1.0) before the method in "
                "optax.chain",
    "foreach": "each method has one implementation, which batches its blocks (compile=True fuses its element-wise "
               "passes)",
    "fused": "each method has one implementation (compile=True fuses its element-wise passes)",
}


def check_keywords(owner: str, signature: inspect.Signature, given: Mapping) -> None:
    """Raise ``TypeError`` for the first of ``given``'s keywords that ``signature`` does not take:
    ``"<owner> got an unexpected keyword 'learning_rate'; did you mean 'lr'?"`` (or what to do
    instead, for an option of torch.optim's it has no counterpart of; or the valid names, where none
    is close)."""
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    valid = [name for name, p in signature.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"]
    for name in given:
        if name in valid:
            continue
        close = [v for v in valid if name in _SYNONYMS.get(v, ())][:1]
        close = close or difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else _INSTEAD.get(name, f"it takes {', '.join(valid)}")
        raise TypeError(f"{owner} got an unexpected keyword {name!r}; {hint}")
