"""Training configuration: a plain dataclass, importable without torch (the CLI builds its flags from it)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import InputError

ACTIVATION_NAMES = ("gelu", "relu", "silu", "tanh")
# what the CLI exports unless told otherwise (train --precision, run): int8, because in bench/speed.py
# section 9 its 10-recall@10 vs fp32 and every test and validation metric held (within 0.002) on
# every data set and width measured, at about half the single-vector latency. export() keeps fp32.
DEFAULT_PRECISION = "int8"


SIGNALS = ("unsupervised", "labels", "pairs")
DOCUMENT_METHODS = ("contrastive", "mean", "none")
LABEL_LOSSES = ("decoupled", "supcon")
LR_GRID = (1e-3, 3e-3)              # searched on validation when TrainConfig.lr is None
TEMPERATURE_GRID = (0.05, 0.1)      # likewise for TrainConfig.temperature (supervised terms)


@dataclass
class TrainConfig:
    """Everything that defines a training run; None means "chosen for you" (see `resolved`).

    Why the defaults are what they are: docs/design.md, measured in bench/results/robustness.md (every
    default across WordNet 1k-20k and digits, 3 seeds) and bench/results/quality.md (WordNet 20k variants).
    """

    # network: refined = x + alpha * f(x), f = MLP with `depth` hidden layers of width `hidden`.
    # 256, not 512: the same test quality across every signal and data set of bench/robustness.py
    # (3 seeds), 15-30% less training time, a smaller and faster refiner (bench/speed.py)
    hidden: int = 256
    depth: int = 1
    activation: str = "gelu"
    normalize: bool = True          # L2-normalise the output (required for inner-product / cosine indexes)
    metric: str = "ip"              # the index metric the refiner is meant for: "ip" or "l2"
    head_dim: int = 128             # projection head width (unsupervised loss only; dropped at export)
    # signals: weights of each loss term. All three None (default): follow the supervision given
    # (labels -> labels, pairs -> pairs, both -> both, none -> unsupervised). Any one set: the
    # others that are None become 0.
    unsupervised_weight: float | None = None  # SimSkip: two augmented views of the same embedding
    label_weight: float | None = None         # supervised contrastive: same label = positive
    pair_weight: float | None = None          # query -> document InfoNCE
    # the label term: "decoupled" scores each same-label row against the other-label rows only; "supcon"
    # (SupCon's L_out, the default before) also against the other same-label rows, which pushes a row's
    # nearest same-label rows away and erases the ranking inside a label (training.supcon). Labels + pairs,
    # WordNet 20k, 3 seeds: mAP@100 x 1.38 with nDCG@10 +0.021, against x 1.29 with +0.022 (docs/design.md)
    label_loss: str = "decoupled"
    # "symmetric" (one refiner for queries and documents) or "query_only" (documents stay raw, the index
    # is not rebuilt). None: query_only when pairs are the only signal, else symmetric (labels need
    # refined documents). Pairs alone, WordNet 1k-20k, 3 seeds, against symmetric: more nDCG@10 on
    # 1k/5k/20k (less on 2k), topic mAP@100 better on 5k/20k and level on 1k/2k, topic p@10 lower
    # on 1k/2k (bench/results/robustness-pairs-mode.md)
    pair_mode: str | None = None
    # corpus rows per step as extra negatives: query_only, raw sampled rows; symmetric, refined, the step's
    # training batch first (already refined for the other terms), the rest sampled: 2,048 rows through the
    # refiner per labels+pairs step instead of 2,560; ex->def up and topic mAP a little down on WordNet 2k-20k
    pair_negatives: int = 1024
    # neighbourhood preservation: symmetric, the KL of in-batch similarities raw vs refined; query_only,
    # corpus rows fed to the query refiner stay put (training.stay_put). None: 1 for a query-only
    # pairs refiner, else 0
    preserve_weight: float | None = None
    # augmentations (unsupervised signal)
    mask_prob: float = 0.3          # each coordinate zeroed with this probability
    noise_scale: float = 0.5        # Gaussian noise, in units of the corpus's per-dimension std
    unsupervised_temperature: float = 0.5  # NT-Xent temperature (SimCLR's default; 0.05 hurt on WordNet)
    # optimisation: a budget in optimizer steps, validated every `eval_every` steps
    temperature: float | None = None  # supervised (labels, pairs) and preservation terms; None: searched
    lr: float | None = None           # None: searched over LR_GRID on validation (fit) / LR_GRID[0] (train)
    weight_decay: float = 1e-4
    batch_size: int = 512           # upper bound: small corpora get smaller batches (more steps per pass)
    max_steps: int = 1000           # optimizer steps at most (label training creeps past it for ~2% more)
    epochs: int | None = None       # optional cap in passes over the training rows
    eval_every: int = 50            # optimizer steps between validations
    patience: int = 4               # validations without improvement before stopping
    search_evals: int = 1           # validations each lr/temperature candidate gets before the best continues
    # seconds of training (the lr/temperature race and the optimizer steps, checked between steps); the
    # guard's final sweep and export come after it, the document step only while budget remains
    time_budget: float | None = None
    val_fraction: float = 0.1       # held-out slice of the corpus for early stopping (train() without a guard)
    max_val: int = 4096             # cap on held-out vectors scored each evaluation (train() without a guard)
    seed: int = 0
    threads: int | None = None      # torch intra-op threads while training (restored after); None: torch's
    progress: bool = True
    # the guard: choose alpha in refined = x + alpha * f(x) (and the checkpoint) on validation metrics
    guard: bool = True
    alphas: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
    tolerance: float = 0.0          # allowed validation drop of any metric below raw (0: no drop at all)
    # > 0: ship the identity when the best gain is within noise at this level (neither the objective's nor any
    # metric's paired-bootstrap interval over the validation queries above 0). 0 (default): ship it, flagged
    # in the report. Opt-in: the fits it refused on WordNet 1k-2k were a coin toss on test (docs/design.md)
    confidence: float = 0.0
    guard_tasks: tuple[str, ...] = ()  # tasks the guard protects and scores ("labels", "pairs"); () = all available
    guard_metrics: tuple[str, ...] = ()  # "task:metric" held to the no-drop rule, e.g. "pairs:ndcg@10"; () = all
    # no labels/pairs to validate on: the largest alpha keeping >= min_agreement of each validation
    # row's raw agreement_k-NN (k = the depth of R@100 / mAP@100; 0.9 lost up to 0.007 of test R@100)
    min_agreement: float = 0.95
    agreement_k: int = 100
    max_val_queries: int = 2000     # per task, for the guard's validation search
    # per task, at the validations during training, which only rank checkpoints (the final alpha sweep
    # scores all max_val_queries): exact search over the corpus is most of a guarded fit's time on
    # large corpora (WordNet 20k labels: 25 of 50 s), and this cuts it to 16 s there
    coarse_val_queries: int = 1000
    # corpus rows those validations search, at most: above it, a fixed seeded sample (the coarse label
    # queries' rows and pair queries' documents, then random rows), refined and searched per checkpoint
    # instead of the whole corpus, so a validation costs the same from 50k rows to any size; the final
    # alpha sweep searches the whole corpus
    coarse_corpus_rows: int = 50_000
    # document-side refinement from the pairs (nudge.py): "contrastive" (default), "mean" or "none". The
    # answer documents' stored vectors are moved, the step chosen on validation (0: none ship)
    documents: str = "contrastive"

    def __post_init__(self):
        if self.activation not in ACTIVATION_NAMES:
            raise InputError(f"activation must be one of {sorted(ACTIVATION_NAMES)}, got {self.activation!r}")
        if self.documents not in DOCUMENT_METHODS:
            raise InputError(f"documents must be one of {list(DOCUMENT_METHODS)}, got {self.documents!r}")
        if self.metric not in ("ip", "l2"):
            raise InputError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.label_loss not in LABEL_LOSSES:
            raise InputError(f"label_loss must be one of {list(LABEL_LOSSES)}, got {self.label_loss!r}")
        if self.pair_mode not in (None, "symmetric", "query_only"):
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
        if any(t not in ("labels", "pairs") for t in self.guard_tasks):
            raise InputError(f"guard_tasks must name 'labels' and/or 'pairs', got {self.guard_tasks}")
        if any(m.partition(":")[0] not in ("labels", "pairs") or not m.partition(":")[2] for m in self.guard_metrics):
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
