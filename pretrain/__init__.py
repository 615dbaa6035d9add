"""MAE pre-training with PAD adapters: models, weights, and (soon) the DeepSpeed engine."""
