"""Models shared by several services (the Wan2.1 VAE is used by the encoder and the decoder)."""
