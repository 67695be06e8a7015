"""Measuring retrieval: ranking metrics and the paired bootstrap (`ranking`), and the one scoring rule the
guard, the document updates and the evaluation report share (`scoring`)."""
from .ranking import (LABEL_FAMILIES, QRELS_FAMILIES, drop_self, knn_recall, paired_bootstrap, per_query_metrics,
                      retrieval_metrics_labels, retrieval_metrics_qrels)

__all__ = ["LABEL_FAMILIES", "QRELS_FAMILIES", "drop_self", "knn_recall", "paired_bootstrap", "per_query_metrics",
           "retrieval_metrics_labels", "retrieval_metrics_qrels"]
