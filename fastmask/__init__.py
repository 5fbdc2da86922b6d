"""fastmask: post-hoc fairness debiasing of trained classifiers by Fisher-importance weight masking."""

__version__ = "0.1.0"
