# the adapter's _apply replaced by a variant: A = updates returned (added outside), B = state returned (not copied in)
import sys, time, torch, numpy as np
import precond_ref.adapters._torch_compile as tc
from precond_ref.tree import tree_flatten
variant = sys.argv[1]
orig = tc._apply
def apply_A(transform, grads, state, params, due, extra, ok=None):
    with_ok = {} if ok is None else {"gradients_ok": ok}
    updates, new_state = transform.update(grads, state, params, due=due, **with_ok, **extra)
    returned = {}
    for key, entries in new_state.groups.items():
        for name, value in entries.items():
            old = state.groups[key][name]
            if value is old: continue
            if value.ndim > 0: old.copy_(value)
            else: returned.setdefault(key, {})[name] = value
    return new_state.count, new_state.nonfinite_count, returned, [u for u in tree_flatten(updates)[0]]
def apply_B(transform, grads, state, params, due, extra, ok=None):
    with_ok = {} if ok is None else {"gradients_ok": ok}
    updates, new_state = transform.update(grads, state, params, due=due, **with_ok, **extra)
    for p, u in zip(tree_flatten(params)[0], tree_flatten(updates)[0]):
        p.add_(u)
    return new_state.count, new_state.nonfinite_count, {k: dict(e) for k, e in new_state.groups.items()}, []
if variant == "A":
    tc._apply = apply_A
    # scalar_updates are added to 0-D params only; add all here
    old_call = tc.CompiledStep._call
    def _call(self, grads, state, params, due, extra):
        out = self._compiled(self.transform, grads, state, params, due, extra)
        count, nf, returned, ups = out
        for p, u in zip(tree_flatten(params)[0], ups): p.add_(u)
        groups = {key: {**entries, **returned.get(key, {})} for key, entries in state.groups.items()}
        return state._replace(count=count, nonfinite_count=nf, groups=groups)
    tc.CompiledStep._call = _call
elif variant == "B":
    tc._apply = apply_B
sys.argv = [sys.argv[0], "faithful", "4", "w1,b1,w2,b2", "1"]
import os
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "leaf.py")).read())
