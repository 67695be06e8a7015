"""Evaluation: refined vs raw vs baselines on held-out queries, with paired-bootstrap intervals (`report`),
the closed-form baselines (`baselines`) and the plots (`plots`)."""
from .report import (BASELINES, DOCUMENT_BASELINES, GROUP_METRICS, HEADLINE, SUPERVISED_BASELINES, EvalConfig,
                     EvalReport, ann_sweep, baselines, build, choose_on_val, choose_refiner, evaluate, faiss_threads)

__all__ = ["BASELINES", "DOCUMENT_BASELINES", "GROUP_METRICS", "HEADLINE", "SUPERVISED_BASELINES", "EvalConfig",
           "EvalReport", "ann_sweep", "baselines", "build", "choose_on_val", "choose_refiner", "evaluate",
           "faiss_threads"]
