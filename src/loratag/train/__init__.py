"""`loratag train`: the loop (loop.py) over a session (session.py), the --time-budget planner (budget.py, fed by
timing.py), frozen-layer caching (frozen.py), data parallelism (dist.py), checkpointed state (state.py, rng.py), the
model card (card.py) and the command's flags (cli.py)."""

__all__ = ["train", "train_and_load"]


def __getattr__(name):
    # lazy: the CLI imports train.cli for its flags, and `loratag --help` should not load torch
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)
