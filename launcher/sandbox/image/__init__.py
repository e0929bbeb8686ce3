"""The sandbox image: ``context`` (the build context and its content hash), ``build`` (build
it, or find it up to date)."""
