"""Training configuration: a plain dataclass, importable without torch (the CLI builds its flags from it)."""
from __future__ import annotations

from dataclasses import dataclass

ACTIVATION_NAMES = ("gelu", "relu", "silu", "tanh")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Why each default is what it is: docs/design.md."""

    # network: refined = x + alpha * f(x), f = MLP with `depth` hidden layers of width `hidden`
    hidden: int = 512
    depth: int = 1
    activation: str = "gelu"
    normalize: bool = True          # L2-normalise the output (required for inner-product / cosine indexes)
    metric: str = "ip"              # the index metric the refiner is meant for: "ip" or "l2"
    head_dim: int = 128             # projection head width (unsupervised loss only; dropped at export)
    # signals: weights of each loss term; 0 switches it off
    unsupervised_weight: float = 1.0       # SimSkip: two augmented views of the same embedding
    label_weight: float = 0.0             # supervised contrastive: same label = positive
    pair_weight: float = 0.0              # query -> document InfoNCE
    pair_mode: str = "symmetric"    # "symmetric" (one refiner for both) or "query_only" (documents stay raw)
    preserve_weight: float = 0.0    # neighbourhood preservation: KL between raw and refined in-batch similarities
    # augmentations (unsupervised signal)
    mask_prob: float = 0.3          # each coordinate zeroed with this probability
    noise_scale: float = 0.5        # Gaussian noise, in units of the corpus's per-dimension std
    unsupervised_temperature: float = 0.5  # NT-Xent temperature (SimCLR's default; 0.05 hurt on WordNet)
    # optimisation
    temperature: float = 0.05       # supervised (labels, pairs) and preservation terms
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 512
    epochs: int = 10
    patience: int = 3               # epochs without held-out improvement before stopping
    val_fraction: float = 0.1       # held-out slice of the corpus for early stopping (unsupervised)
    max_val: int = 4096             # cap on held-out vectors scored each epoch
    seed: int = 0
    threads: int | None = None      # torch intra-op threads; None leaves torch's default
    progress: bool = True
    # the guard: choose alpha in refined = x + alpha * f(x) (and the epoch) on validation metrics
    guard: bool = True
    alphas: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
    tolerance: float = 0.0          # allowed validation drop of any metric below raw (0: no drop at all)
    guard_tasks: tuple[str, ...] = ()  # tasks the guard protects and scores ("labels", "pairs"); () = all available
    guard_metrics: tuple[str, ...] = ()  # "task:metric" held to the no-drop rule, e.g. "pairs:ndcg@10"; () = all
    min_agreement: float = 0.9      # no labels/pairs to validate on: keep >= this share of raw 10-NN
    max_val_queries: int = 2000     # per task, for the guard's validation search

    def __post_init__(self):
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_NAMES)}, got {self.activation!r}")
        if self.metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.pair_mode not in ("symmetric", "query_only"):
            raise ValueError(f"pair_mode must be 'symmetric' or 'query_only', got {self.pair_mode!r}")
        for name in ("hidden", "depth", "head_dim", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (contrastive losses need negatives)")
        if not 0 <= self.mask_prob < 1:
            raise ValueError(f"mask_prob must be in [0, 1), got {self.mask_prob}")
        if self.temperature <= 0 or self.unsupervised_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {self.temperature}, {self.unsupervised_temperature}")
        if self.preserve_weight < 0:
            raise ValueError(f"preserve_weight must be >= 0, got {self.preserve_weight}")
        if min(self.unsupervised_weight, self.label_weight, self.pair_weight) < 0 or self.unsupervised_weight + self.label_weight + self.pair_weight == 0:
            raise ValueError("signal weights must be >= 0 and at least one must be > 0")
        if self.pair_mode == "query_only" and (self.unsupervised_weight > 0 or self.label_weight > 0):
            raise ValueError("pair_mode='query_only' refines queries only; combine it with no other signal")
        if any(t not in ("labels", "pairs") for t in self.guard_tasks):
            raise ValueError(f"guard_tasks must name 'labels' and/or 'pairs', got {self.guard_tasks}")
        if any(m.partition(":")[0] not in ("labels", "pairs") or not m.partition(":")[2] for m in self.guard_metrics):
            raise ValueError(f"guard_metrics must be 'task:metric' names such as 'pairs:ndcg@10', got {self.guard_metrics}")
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas must be values in [0, 1], got {self.alphas}")
        if self.metric == "ip" and not self.normalize:
            raise ValueError("an inner-product refiner must L2-normalise its output (normalize=True): "
                             "after a non-isometric transform raw inner products are not comparable")
