"""IF-Shampoo candidates on examples/char_lm_torch.py (300 steps, lr 1.0, seeds 0-2): validation loss."""
import sys, json, functools, statistics, time, io, contextlib
sys.path.insert(0, "examples")
import torch
torch.set_num_threads(1)
import char_lm_torch as lm
from precond_ref.adapters import torch as pt
D = {1: "diagonal", 2: "dense", 3: "dense", 4: "dense"}
OLD = {"preconditioner_momentum": 0.5, "structures": "dense"}
CANDS = {
    "old": OLD, "new": {"preconditioner_momentum": 0.0, "structures": None},
    "a2=0-dense": {"preconditioner_momentum": 0.0, "structures": "dense"}, "1d-diag-only": {"preconditioner_momentum": 0.5, "structures": None},
    "old-bf16": {**OLD, "factor_dtype": torch.bfloat16}, "new-bf16": {"preconditioner_momentum": 0.0, "structures": None, "factor_dtype": torch.bfloat16},
    "default": {}, "a2=0": {"preconditioner_momentum": 0.0}, "1d-diag": {"structures": D},
    "a2=0+1d-diag": {"preconditioner_momentum": 0.0, "structures": D},
    "bf16": {"factor_dtype": torch.bfloat16}, "bf16+1d-diag": {"factor_dtype": torch.bfloat16, "structures": D},
    "f32-b0.1": {"preconditioner_lr": 0.1}, "bf16-b0.1": {"factor_dtype": torch.bfloat16, "preconditioner_lr": 0.1},
    "bf16-sr+S12": {"factor_dtype": torch.bfloat16, "factor_rounding": "stochastic", "structures": None},
}
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
import os
LR = float(os.environ.get("LR", "1.0"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rounding import to_bf16_grid as _round
SIM = {"sim-rtn": (False, OLD), "sim-sr": (True, OLD), "sim-sr-a2=0": (True, {"preconditioner_momentum": 0.0})}
CANDS.update({k: v[1] for k, v in SIM.items()})
for cand in sys.argv[1].split(","):
    cls = type("IFS", (pt.IFShampoo,), {})
    kw = CANDS[cand]
    orig = pt.IFShampoo.__init__
    def init(self, params, *a, _kw=kw, **k):
        orig(self, params, *a, **{**k, **_kw})
    cls.__init__ = init
    if cand in SIM:
        def step(self, *a, _st=SIM[cand][0], **k):
            out = pt.IFShampoo.step(self, *a, **k)
            with torch.no_grad():
                for st in self.state.values():
                    for key, v in st.items():
                        if isinstance(v, torch.Tensor) and ("/factor/" in key or "/factor_momentum/" in key):
                            v.copy_(_round(v, _st))
            return out
        cls.step = step
    lm.OPTIMIZERS["if_shampoo"] = (cls, LR, True)
    vals, t0 = [], time.time()
    for seed in (0, 1, 2):
        with contextlib.redirect_stdout(io.StringIO()):
            out = lm.main(["--optimizer", "if_shampoo", "--steps", str(steps), "--seed", str(seed), "--sample", "0", "--out", "/tmp/ifstate/lmout"])
        vals.append(out["validation_loss"])
    print(json.dumps({"cand": cand, "task": f"char_lm {steps} lr {LR}", "mean": statistics.mean(vals), "std": statistics.stdev(vals), "values": vals, "s": round(time.time() - t0)}), flush=True)
