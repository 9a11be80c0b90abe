"""`loratag serve`: the HTTP application (app.py) over an adapter pool (pool.py: one base, many adapters, each row
of a batch through its own adapter by stacked matmuls, multilora.py), requests batched on worker threads
(batcher.py), ASGI middleware (asgi.py: body limit, metrics), the web page (page.html), the settings (settings.py)
and the flags (cli.py)."""
