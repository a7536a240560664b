"""Building blocks shared by the model files: norms, RoPE, paged attention, on-device sampling."""
