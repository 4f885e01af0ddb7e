"""Sizes of the ``reproduce`` experiments and the papers they check (pure data: no NumPy, no torch).

``quick`` is for the test suite (every experiment in seconds; its verdicts mean little), the
default is what ``docs/reproduce.md`` shows (its run time, measured by the run, is in the report),
and ``large`` is a configuration for one GPU (``--device cuda``), documented and not run here.
"""

from __future__ import annotations

PAPERS = {
    "asgo": {
        "short": "ASGO",
        "title": "ASGO: Adaptive Structured Gradient Optimization",
        "authors": "An, Liu, Pan, Ren, Ma, Goldfarb, Zhang",
        "venue": "NeurIPS 2025, arXiv 2503.20762",
    },
    "sketchy": {
        "short": "Sketchy",
        "title": "Sketchy: Memory-efficient Adaptive Regularization with Frequent Directions",
        "authors": "Feinberg, Chen, Sun, Anil, Hazan",
        "venue": "NeurIPS 2023, arXiv 2302.03764",
    },
    "root_free": {
        "short": "Root-free",
        "title": "Can We Remove the Square-Root in Adaptive Gradient Methods? A Second-Order Perspective",
        "authors": "Lin, Dangel, Eschenhagen, Bae, Turner, Makhzani",
        "venue": "ICML 2024, arXiv 2402.03496",
    },
    "mbf": {
        "short": "MBF",
        "title": "A Mini-Block Fisher Method for Deep Neural Networks",
        "authors": "Bahamou, Goldfarb, Ren",
        "venue": "AISTATS 2023, arXiv 2202.04124",
    },
    "agd": {
        "short": "AGD",
        "title": "AGD: an Auto-switchable Optimizer using Stepwise Gradient Difference for Preconditioning Matrix",
        "authors": "Yue, Ye, Jiang, Liu, Zhang",
        "venue": "NeurIPS 2023, arXiv 2312.01658",
    },
}

#: ``seeds``: evaluation seeds of the digits, synthetic, online and Beale problems (seconds per
#: run); ``lm_seeds``: of the char LM; ``tune_seeds`` / ``lm_tune_seeds``: how many seeds each
#: learning rate is scored on (on the validation split), drawn from ``TUNE_SEED_OFFSET`` on so
#: that no tuning seed is an evaluation seed; tuning runs as long as the evaluation runs.
#: ``grid``: learning rates per sweep before extension, ``grid_extend``: how many rates a sweep may
#: add past a winning edge (it stops once both edges score worse than an inner rate);
#: ``digits_epochs``: the digits runs; ``bf16_epochs``: RootFree-4's bfloat16 CNN runs;
#: ``mbf_epochs`` and ``mbf_refresh``: the MBF runs and their inverse-refresh interval T2 (at
#: least 30 refreshes, 22 steps an epoch); ``mbf_dampings``: the damping factors (times the
#: authors' value) MBF's rate is swept at; ``wide``: the width of the MLP of the memory-quality
#: claims, ``wide_ranks``: Sketchy's ranks there (with the table's); ``asgo_ranks``: the gradient
#: ranks of ASGO-4's least squares.
SIZES = {
    "quick": {
        "seeds": 2,
        "lm_seeds": 2,
        "tune_seeds": 1,
        "lm_tune_seeds": 1,
        "digits_epochs": 1,
        "bf16_epochs": 1,
        "mbf_epochs": 1,
        "mbf_refresh": 5,
        "mbf_dampings": [1.0],
        "lm": {"width": 16, "layers": 1, "heads": 2, "context": 16, "batch": 8, "eval_batches": 2},
        "lm_steps": 12,
        "grid": 1,
        "grid_extend": 0,
        "checkpoints": 3,
        "oco_rounds": 100,
        "oco_grid": 2,
        "oco_rank": 4,
        "oco_ranks": [2, 4],
        "agd_deltas": [1e-8, 1e-4],
        "synthetic_steps": 20,
        "asgo_ranks": [1, 32],
        "wide": 32,
        "wide_ranks": [4],
        "beale_steps": 50,
        "device": "cpu",
    },
    "default": {
        "seeds": 20,
        "lm_seeds": 8,
        "tune_seeds": 3,
        "lm_tune_seeds": 1,
        "digits_epochs": 8,
        "bf16_epochs": 8,
        "mbf_epochs": 7,
        "mbf_refresh": 5,
        "mbf_dampings": [0.1, 1.0, 10.0],
        "lm": {"width": 32, "layers": 1, "heads": 4, "context": 32, "batch": 16, "eval_batches": 8},
        "lm_steps": 80,
        "grid": 3,
        "grid_extend": 8,
        "checkpoints": 10,
        "oco_rounds": 150,  # 0: every example of the data set
        "oco_grid": 5,
        "oco_rank": 8,
        "oco_ranks": [2, 8],
        "agd_deltas": [1e-8, 1e-2],
        "synthetic_steps": 60,
        "asgo_ranks": [1, 4, 32],
        "wide": 128,
        "wide_ranks": [4],
        "beale_steps": 1000,
        "device": "cpu",
    },
    "large": {
        "seeds": 20,
        "lm_seeds": 10,
        "tune_seeds": 3,
        "lm_tune_seeds": 2,
        "digits_epochs": 40,
        "bf16_epochs": 40,
        "mbf_epochs": 100,
        "mbf_refresh": 25,
        "mbf_dampings": [0.1, 1.0, 10.0],
        "lm": {"width": 256, "layers": 6, "heads": 8, "context": 256, "batch": 64, "eval_batches": 32},
        "lm_steps": 3000,
        "grid": 5,
        "grid_extend": 4,
        "checkpoints": 20,
        "oco_rounds": 0,
        "oco_grid": 13,
        "oco_rank": 16,
        "oco_ranks": [1, 2, 4, 8, 16, 32, 64],
        "agd_deltas": [1e-8, 1e-6, 1e-4, 1e-3, 1e-2],
        "synthetic_steps": 1000,
        "asgo_ranks": [1, 2, 4, 8, 16, 32],
        "wide": 1024,
        "wide_ranks": [16, 64, 256],
        "beale_steps": 5000,
        "device": "cuda",
    },
}

#: Tuning seeds start here: disjoint from every evaluation seed of ``--seed`` below it.
TUNE_SEED_OFFSET = 1000

#: How far below a float64 fingerprint's tolerance a loss must stay when the learning rate moves
#: by one rounding unit, for the loss to be compared (:func:`.papers.conditioned_steps`). Other rounding
#: paths move an ill-conditioned loss more than that nudge does: on a sample of the rank-1 problem
#: that ASGO's Algorithm 1 conditioned badly, MKL's AVX2, SSE4.2 and AVX-512 kernels and its
#: conditional bitwise-reproducible mode moved its fifth loss by 3.8e-8 to 5.3e-8 relative, 220
#: times the nudge's 2.2e-10; the bound leaves a factor 45 over that.
NUDGE_MARGIN = 1e4
