"""``gguf-moe farm``: many models into many files (every preset, imatrix, eval, model card,
manifest) from one plan file, resumable, on a process pool here or on a Ray cluster.

``plan`` reads the YAML plan; ``tasks`` expands it into tasks and runs one; ``journal``
records what completed; ``executors`` runs tasks (local process pool, Ray); ``run`` is the
driver; ``cli`` the two commands.  See docs/farm.md.
"""
