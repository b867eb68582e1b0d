"""parlay: improving language-model negotiators by self-play in Deal or No Deal."""

__version__ = "0.1.0"
