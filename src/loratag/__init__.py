"""loratag: LoRA fine-tuning, evaluation and serving of transformer token classifiers."""

__version__ = "0.1.0"

__all__ = ["Config", "Tagger", "__version__", "evaluate", "train"]


def __getattr__(name):
    # Lazy re-exports: `import loratag` (and `loratag --help`) stays fast, torch loads on first use.
    if name == "Config":
        from .config import Config

        return Config
    if name == "Tagger":
        from .tagger import Tagger

        return Tagger
    if name == "train":
        from .train import train

        return train
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    raise AttributeError(name)
