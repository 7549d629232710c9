"""Training-side tools for edge-gateway models: the reference anomaly autoencoder, ONNX export, manifests.

Only `autoencoder`, `export` and `demo_model` need PyTorch; `data`, `evaluate` and `manifest` do not.
"""
