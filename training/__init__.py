"""Learning side of streamtune: model, replay, training rounds, registry, gate, evaluation."""
