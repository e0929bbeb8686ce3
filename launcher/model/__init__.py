"""What users write, as typed data: policies, catalogs and SQL statements.

``policy`` (sandbox policies and their YAML), ``catalog`` and ``catalog_yaml`` (tables,
connections, roles, secret *names*), ``sql`` (the bounded parse of a statement into its
tables) and ``mounts`` (where a sandbox finds the files a binding names). Imports only the
shared leaves.
"""
