"""The Textual UI. It never imports torch or transformers."""
