"""The web app of `anymodal serve` (Gradio): `web.py` builds and launches it."""
