"""Models: the timm ViT encoder, the adapter-insertion mechanism, the PAD adapter, and MAE."""
