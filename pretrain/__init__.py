"""MAE pre-training with PAD adapters: models, weights, the DeepSpeed engine and the training loop."""
