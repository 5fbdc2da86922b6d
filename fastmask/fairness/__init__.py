"""The measures of fairness and accuracy: the training objectives (:mod:`~fastmask.fairness.losses`: the weighted
BCE and the differentiable bias functions) and the evaluation metrics (:mod:`~fastmask.fairness.metrics`: AUC,
accuracy, the group gaps in every form, per-group tables). Pure functions of logits, labels and groups; they import
nothing of fastmask."""
