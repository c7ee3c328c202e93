"""FiftyOne: datasets of the anchor, pool and inbox with predictions, evaluation, curation and review in the App."""
