"""The user's model: splitting it into head and feature extractor (:mod:`~fastmask.model.head`), building it and
reading / writing its weights (:mod:`~fastmask.model.weights`), and scoring it on a loader
(:mod:`~fastmask.model.scoring`: the one function that turns a model and a loader into labels, probabilities and
groups)."""
