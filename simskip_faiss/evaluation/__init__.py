"""Evaluation: refined vs raw vs baselines on held-out queries, with paired-bootstrap intervals (`report`),
the ANN fidelity sweep (`ann`), the free baselines fitted on train and chosen on val (`methods`) from the
closed-form maps (`baselines`), and the plots (`plots`)."""
from .ann import ann_sweep, faiss_threads
from .methods import BASELINES, DOCUMENT_BASELINES, SUPERVISED_BASELINES, baselines, build, choose_on_val
from .report import GROUP_METRICS, HEADLINE, EvalConfig, EvalReport, choose_refiner, evaluate

__all__ = ["BASELINES", "DOCUMENT_BASELINES", "GROUP_METRICS", "HEADLINE", "SUPERVISED_BASELINES", "EvalConfig",
           "EvalReport", "ann_sweep", "baselines", "build", "choose_on_val", "choose_refiner", "evaluate",
           "faiss_threads"]
