"""Training configuration (a plain dataclass, importable without torch) and the defaults the commands share.

Each TrainConfig field carries its one-sentence help (and, where the values are a fixed set, its choices)
in its metadata: the CLI builds one flag per field from them, so the flags and the Python API share one
definition of every default and its meaning (`field_help`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .errors import InputError

ACTIVATION_NAMES = ("gelu", "relu", "silu", "tanh")
METRICS = ("ip", "l2")  # inner product (cosine on normalised vectors) or squared L2
SIGNALS = ("unsupervised", "labels", "pairs")
DOCUMENT_METHODS = ("contrastive", "mean", "none")
LABEL_LOSSES = ("decoupled", "supcon")
PAIR_MODES = ("symmetric", "query_only")
TASKS = ("labels", "pairs")  # what validation scores: label neighbours, query -> document pairs
LR_GRID = (1e-3, 3e-3)              # searched on validation when TrainConfig.lr is None
TEMPERATURE_GRID = (0.05, 0.1)      # likewise for TrainConfig.temperature (supervised terms)
# Defaults of the commands and the library functions they call, each defined here once.
THREADS = 2                      # onnxruntime and FAISS threads of a command
INDEX_FACTORY = "HNSW32"         # the index a bundle is built with and whose ANN recall is swept
EVAL_FACTORY = "Flat"            # exact search for quality metrics, so ANN error does not blur them
MERGEABLE_FACTORY = "IVF1024,Flat"  # a distributed build's index: its shards merge
INDEX_TRAIN_SIZE = 100_000       # vectors sampled to train IVF/PQ indexes
MAX_EVAL_QUERIES = 5000          # test queries per task that evaluation scores (a seeded sample above it)
MAX_VAL_QUERIES = 2000           # validation queries per task that choose alpha (and the baselines' settings)
WORDNET_SYNSETS = 20_000         # the WordNet subset the built-in data set samples
# What the CLI exports unless told otherwise (train --precision auto, run): int8 held every test and
# validation metric against fp32 at about half the single-vector latency (bench/results/speed.md).
DEFAULT_PRECISION = "int8"


def _opt(default: Any, help: str, choices: tuple | None = None, metavar: str | None = None) -> Any:
    """A TrainConfig field: its default, one sentence of help, and the values it may take (if a fixed set)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if metavar is not None:
        meta["metavar"] = metavar
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that defines a training run; None means "chosen for you" (see `resolved`).

    refined = x + alpha * f(x), f an MLP; the signals are the loss terms it trains with, the guard
    chooses alpha (and the checkpoint) on validation. Why the defaults are what they are: docs/design.md,
    measured in bench/results/robustness.md (every default across WordNet 1k-20k and digits, 3 seeds) and
    bench/results/quality.md (WordNet 20k variants).
    """

    # network
    hidden: int = _opt(256, "Width of each hidden layer of f.")
    depth: int = _opt(1, "Number of hidden layers of f.")
    activation: str = _opt("gelu", "Activation of the hidden layers.", ACTIVATION_NAMES)
    normalize: bool = _opt(True, "L2-normalise the refined output (required for inner-product and cosine indexes).")
    metric: str = _opt("ip", "The index metric the refiner is meant for.", METRICS)
    head_dim: int = _opt(128, "Width of the projection head of the unsupervised loss (dropped at export).")
    # signals: all three weights None follows the supervision given; any one set makes the other None ones 0
    unsupervised_weight: float | None = _opt(
        None, "Weight of the SimSkip term (two augmented views of one embedding); unset: follow the supervision.")
    label_weight: float | None = _opt(
        None, "Weight of the supervised contrastive term (same label = positive); unset: follow the supervision.")
    pair_weight: float | None = _opt(
        None, "Weight of the query -> document InfoNCE term; unset: follow the supervision.")
    label_loss: str = _opt(
        "decoupled", "Label term: decoupled scores same-label rows against other-label rows only (keeping the "
        "ranking inside a label), supcon against every other row (SupCon's L_out).", LABEL_LOSSES)
    pair_mode: str | None = _opt(
        None, "symmetric refines queries and documents, query_only refines queries (the index keeps raw "
        "vectors); unset: query_only for pairs alone, else symmetric.", PAIR_MODES)
    pair_negatives: int = _opt(1024, "Corpus rows added to each pair step as extra negatives.")
    preserve_weight: float | None = _opt(
        None, "Weight of neighbourhood preservation (raw vs refined in-batch similarities; corpus rows stay put "
        "under a query-only refiner); unset: 1 for a query-only pairs refiner, else 0.")
    # augmentations (unsupervised signal)
    mask_prob: float = _opt(0.3, "Probability that an augmentation zeroes each coordinate.")
    noise_scale: float = _opt(0.5, "Gaussian noise of an augmentation, in units of the corpus's per-dimension std.")
    unsupervised_temperature: float = _opt(0.5, "Temperature of the unsupervised NT-Xent loss.")
    # optimisation: a budget in optimizer steps, validated every `eval_every` steps
    temperature: float | None = _opt(
        None, "Temperature of the supervised and preservation terms; unset: searched over TEMPERATURE_GRID.")
    lr: float | None = _opt(
        None, "Learning rate; unset: searched over LR_GRID on validation (guarded) or its first value.")
    weight_decay: float = _opt(1e-4, "AdamW weight decay.")
    batch_size: int = _opt(512, "Rows per step at most (small corpora get smaller batches).")
    max_steps: int = _opt(1000, "Optimizer steps at most.")
    epochs: int | None = _opt(None, "Passes over the training rows at most; unset: no cap.")
    eval_every: int = _opt(50, "Optimizer steps between validations.")
    patience: int = _opt(4, "Validations without improvement before training stops.")
    search_evals: int = _opt(
        1, "Validations each learning rate / temperature candidate gets before the best one continues.")
    time_budget: float | None = _opt(
        None, "Seconds of training (the guard's final sweep and export come after it); unset: no limit.")
    val_fraction: float = _opt(0.1, "Corpus fraction held out for early stopping when training without the guard.")
    max_val: int = _opt(4096, "Held-out vectors scored at each validation when training without the guard.")
    seed: int = _opt(0, "Seed of initialisation, sampling and augmentations.")
    threads: int | None = _opt(None, "torch intra-op threads while training (restored after); unset: torch's.")
    progress: bool = _opt(True, "Show progress bars.")
    # the guard: choose alpha in refined = x + alpha * f(x) (and the checkpoint) on validation metrics
    guard: bool = _opt(True, "Choose alpha and the checkpoint on validation, never shipping a drop below raw.")
    alphas: tuple[float, ...] = _opt((0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0),
                                     "The alpha values the guard tries, in [0, 1].", metavar="A")
    tolerance: float = _opt(0.0, "Validation drop of any metric below raw the guard allows.")
    confidence: float = _opt(
        0.0, "Above 0, ship the identity when no gain's paired-bootstrap interval at this level is above 0; "
        "0 ships the gain and flags it in the report.")
    guard_tasks: tuple[str, ...] = _opt((), "Tasks the guard protects and scores; none given: every task with "
                                        "validation data.", TASKS)
    guard_metrics: tuple[str, ...] = _opt((), "Metrics held to the no-drop rule, e.g. pairs:ndcg@10; none given: "
                                          "all.", metavar="TASK:METRIC")
    min_agreement: float = _opt(
        0.95, "Without labels or pairs to validate on, the share of each row's raw nearest neighbours the "
        "largest shipped alpha keeps.")
    agreement_k: int = _opt(100, "Nearest neighbours per row that min_agreement compares.")
    max_val_queries: int = _opt(MAX_VAL_QUERIES, "Validation queries per task in the guard's final alpha sweep.")
    coarse_val_queries: int = _opt(1000, "Validation queries per task at the validations during training, "
                                   "which only rank checkpoints.")
    coarse_corpus_rows: int = _opt(50_000, "Corpus rows the validations during training search at most (a fixed "
                                   "seeded sample above it; the final sweep searches the whole corpus).")
    documents: str = _opt(
        "contrastive", "Move the stored vectors of documents that training queries found (contrastive, mean, or "
        "none), the step chosen on validation; the updates travel beside the refiner file and the index applies "
        "them.", DOCUMENT_METHODS)

    def __post_init__(self):
        if self.activation not in ACTIVATION_NAMES:
            raise InputError(f"activation must be one of {sorted(ACTIVATION_NAMES)}, got {self.activation!r}")
        if self.documents not in DOCUMENT_METHODS:
            raise InputError(f"documents must be one of {list(DOCUMENT_METHODS)}, got {self.documents!r}")
        if self.metric not in METRICS:
            raise InputError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.label_loss not in LABEL_LOSSES:
            raise InputError(f"label_loss must be one of {list(LABEL_LOSSES)}, got {self.label_loss!r}")
        if self.pair_mode not in (None, *PAIR_MODES):
            raise InputError(f"pair_mode must be 'symmetric', 'query_only' or None (chosen for you), got {self.pair_mode!r}")
        for name in ("hidden", "depth", "head_dim", "batch_size", "max_steps", "eval_every", "patience", "search_evals",
                     "agreement_k", "coarse_val_queries", "coarse_corpus_rows"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs <= 0:
            raise InputError(f"epochs must be positive or None, got {self.epochs}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise InputError(f"time_budget must be a positive number of seconds or None, got {self.time_budget}")
        if self.batch_size < 2:
            raise InputError("batch_size must be at least 2 (contrastive losses need negatives)")
        if self.pair_negatives < 0:
            raise InputError(f"pair_negatives must be >= 0, got {self.pair_negatives}")
        if not 0 <= self.mask_prob < 1:
            raise InputError(f"mask_prob must be in [0, 1), got {self.mask_prob}")
        if (self.temperature is not None and self.temperature <= 0) or self.unsupervised_temperature <= 0:
            raise InputError(f"temperatures must be positive, got {self.temperature}, {self.unsupervised_temperature}")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"lr must be positive or None, got {self.lr}")
        if self.preserve_weight is not None and self.preserve_weight < 0:
            raise InputError(f"preserve_weight must be >= 0, got {self.preserve_weight}")
        weights = [w for w in self.weights().values() if w is not None]
        if any(w < 0 for w in weights) or (len(weights) == 3 and sum(weights) == 0):
            raise InputError("signal weights must be >= 0 and at least one must be > 0")
        if any(t not in TASKS for t in self.guard_tasks):
            raise InputError(f"guard_tasks must name 'labels' and/or 'pairs', got {self.guard_tasks}")
        if any(m.partition(":")[0] not in TASKS or not m.partition(":")[2] for m in self.guard_metrics):
            raise InputError(f"guard_metrics must be 'task:metric' names such as 'pairs:ndcg@10', got {self.guard_metrics}")
        if not 0 <= self.confidence < 1:
            raise InputError(f"confidence must be in [0, 1) (0: flag a gain within noise, do not refuse it), got {self.confidence}")
        if not 0 <= self.min_agreement <= 1:
            raise InputError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise InputError(f"alphas must be values in [0, 1], got {self.alphas}")
        if self.metric == "ip" and not self.normalize:
            raise InputError("an inner-product refiner must L2-normalise its output (normalize=True): "
                             "after a non-isometric transform raw inner products are not comparable")
        if self.is_resolved():
            self._check_signals()

    def weights(self) -> dict[str, float | None]:
        """The three signal weights by name (None = not set)."""
        return {"unsupervised": self.unsupervised_weight, "labels": self.label_weight, "pairs": self.pair_weight}

    def is_resolved(self) -> bool:
        return (all(w is not None for w in self.weights().values()) and self.preserve_weight is not None
                and self.pair_mode is not None)

    def signals(self) -> list[str]:
        """The signals a resolved config trains with (weight > 0), plus "preserve"."""
        on = [k for k, w in self.weights().items() if w]
        return on + (["preserve"] if self.preserve_weight else [])

    def apply_to(self) -> str:
        """What the trained refiner must be applied to: "queries" (query-only pairs) or "both"."""
        return "queries" if self.pair_mode == "query_only" and self.pair_weight else "both"

    def resolved(self, has_labels: bool, has_pairs: bool) -> "TrainConfig":
        """A copy with concrete signal weights: explicit ones kept, the rest following the supervision.

        Defaults (measured in bench/results/robustness.md): labels -> label_weight 1; pairs ->
        pair_weight 1, query-only with preserve_weight 1 (documents stay raw, and so do document-like
        queries); both -> both, symmetric; neither -> the paper's unsupervised signal. preserve_weight
        None -> 0 except for that query-only refiner.
        """
        w = self.weights()
        if all(v is None for v in w.values()):
            w = {"unsupervised": 0.0 if has_labels or has_pairs else 1.0,
                 "labels": 1.0 if has_labels else 0.0, "pairs": 1.0 if has_pairs else 0.0}
        w = {k: float(v or 0.0) for k, v in w.items()}
        mode = self.pair_mode or ("query_only" if w["pairs"] and not w["unsupervised"] and not w["labels"] else "symmetric")
        preserve = self.preserve_weight
        if preserve is None:
            preserve = 1.0 if mode == "query_only" and w["pairs"] else 0.0
        cfg = replace(self, unsupervised_weight=w["unsupervised"], label_weight=w["labels"], pair_weight=w["pairs"],
                      pair_mode=mode, preserve_weight=float(preserve))
        if cfg.label_weight > 0 and not has_labels:
            raise InputError("label_weight > 0 but no labels were given")
        if cfg.pair_weight > 0 and not has_pairs:
            raise InputError("pair_weight > 0 but no queries with query->document pairs were given")
        return cfg

    def _check_signals(self) -> None:
        if self.pair_mode == "query_only" and (self.unsupervised_weight > 0 or self.label_weight > 0):
            raise InputError("pair_mode='query_only' refines queries only; combine it with no other signal")


def field_help(f: Any) -> tuple[str, tuple | None, str | None]:
    """(help, choices, metavar) of a TrainConfig field, as its metadata states them."""
    return f.metadata["help"], f.metadata.get("choices"), f.metadata.get("metavar")
