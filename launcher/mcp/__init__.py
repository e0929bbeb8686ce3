"""duckcell as an MCP server: each agent conversation gets its own sandboxed DuckDB session.

``server`` builds the tools; ``conversation`` is one MCP session's duckcell session (opened at
its first statement, kept while the conversation lasts, ended with it); ``backend`` is the
port the tools run SQL through, with two implementations: ``local`` (an embedded launcher on
this host) and ``remote`` (a control plane's ``Query`` service, with an API key). ``stream``
decodes the Arrow IPC bytes as they come, ``results`` bounds and formats a result for a
model, ``export`` writes a whole result to a file, and ``endpoint`` serves the tools over
streamable HTTP in the control plane's process. See ``docs/mcp.md``.
"""
