"""`loratag predict`: input and output formats (formats.py), sharded resumable prediction (shards.py) on this
machine or a Ray cluster (ray.py), and the command's flags (cli.py)."""
