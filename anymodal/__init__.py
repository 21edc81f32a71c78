"""anymodal: unified any-to-any generators."""
__version__ = "0.1.0"
