"""Model building blocks: linear layers (tensor-parallel ready), norms, rotary embedding, activations."""
