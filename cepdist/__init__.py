"""cepdist: energy-guided diffusion policies (QGPO / contrastive energy prediction) for offline RL."""
__version__ = "0.1.0"
