"""IF-Shampoo candidates on compare's three digits models: test loss, 3 seeds, torch float32."""
import os, sys, json, dataclasses, statistics, time
import torch
torch.set_num_threads(1)
from precond_ref.compare import methods as M
from precond_ref.compare import training, digits

OLD = {"preconditioner_momentum": 0.5, "structures": "dense"}
CANDS = {
    "a2=0-dense": {"preconditioner_momentum": 0.0, "structures": "dense"}, "old": OLD, "new": {"preconditioner_momentum": 0.0, "structures": None},
    "old-bf16": {**OLD, "factor_dtype": torch.bfloat16}, "new-bf16": {"preconditioner_momentum": 0.0, "structures": None, "factor_dtype": torch.bfloat16},
    "default": {},
    "a2=0": {"preconditioner_momentum": 0.0},
    "1d-diag": {"structures": {1: "diagonal", 2: "dense", 3: "dense", 4: "dense"}},
    "a2=0+1d-diag": {"preconditioner_momentum": 0.0, "structures": {1: "diagonal", 2: "dense", 3: "dense", 4: "dense"}},
    "bf16": {"factor_dtype": torch.bfloat16},
    "bf16+1d-diag": {"factor_dtype": torch.bfloat16, "structures": {1: "diagonal", 2: "dense", 3: "dense", 4: "dense"}},
    "bf16-b0.1": {"factor_dtype": torch.bfloat16, "preconditioner_lr": 0.1},
    "f32-b0.1": {"preconditioner_lr": 0.1},
    "bf16-sr+S12": {"factor_dtype": torch.bfloat16, "factor_rounding": "stochastic", "structures": None},
}
import precond_ref.adapters.torch as pt
_orig_step = pt.IFShampoo.step
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rounding import to_bf16_grid as _round

def make_step(stochastic, which):
    def step(self, *a, **k):
        out = _orig_step(self, *a, **k)
        with torch.no_grad():
            for s in self.state.values():
                for key, v in s.items():
                    if isinstance(v, torch.Tensor) and any(f"/{w}/" in key for w in which):
                        v.copy_(_round(v, stochastic))
        return out
    return step

SIM = {"sim-rtn": (False, ("factor", "factor_momentum")), "sim-sr": (True, ("factor", "factor_momentum")),
       "sim-rtn-a2=0": (False, ("factor",)), "sim-sr-a2=0": (True, ("factor",))}
CANDS.update({"sim-rtn": OLD, "sim-sr": OLD, "sim-rtn-a2=0": {"preconditioner_momentum": 0.0}, "sim-sr-a2=0": {"preconditioner_momentum": 0.0}})
cands = sys.argv[1].split(",")
models = sys.argv[2].split(",") if len(sys.argv) > 2 else ["mlp", "cnn", "autoencoder"]
import os
seeds = list(range(int(os.environ.get("SEED0", "0")), int(os.environ.get("SEED0", "0")) + int(os.environ.get("SEEDS", "3"))))
base = next(e for e in M.METHODS if e.name == "if_shampoo")
x_tr, y_tr, x_te, y_te = digits.load_digits_split()
for cand in cands:
    pt.IFShampoo.step = make_step(*SIM[cand]) if cand in SIM else _orig_step
    for model in models:
        hp = {**base.hyperparameters["*"], **CANDS[cand]}
        hp.pop("preconditioner_momentum", None) if "preconditioner_momentum" not in CANDS[cand] else None
        if "preconditioner_momentum" not in CANDS[cand]:
            hp["preconditioner_momentum"] = 0.5
        entry = dataclasses.replace(base, hyperparameters={"*": hp})
        losses, accs = [], []
        t0 = time.time()
        for seed in seeds:
            r = training.train_one(entry, model, (x_tr, y_tr, x_te, y_te), epochs=int(os.environ.get("EPOCHS", "12")), batch_size=64, seed=seed,
                                   backend="torch", dtype="float32", learning_rate=float(os.environ.get("LR", "0.1")), curves=False)
            losses.append(r["test_loss"]); accs.append(r.get("test_accuracy"))
        row = {"cand": cand, "model": model, "lr": os.environ.get("LR", "0.1"), "epochs": os.environ.get("EPOCHS", "12"), "loss_mean": statistics.mean(losses), "loss_std": statistics.stdev(losses),
               "losses": losses, "accs": accs, "s": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
