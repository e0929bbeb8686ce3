"""The data a query reads and writes: object store, cache, listings, writes, secrets, grants.

``datapath`` turns a query's tables into bindings of cached files (and releases them);
never imports ``launcher.sandbox``: the executor joins the two.
"""
