"""suti: SuTI (subject-driven text-to-image generation via apprenticeship learning) in JAX."""
__version__ = "0.1.0"
