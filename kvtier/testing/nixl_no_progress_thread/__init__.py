"""A folder for ``PYTHONPATH`` whose ``sitecustomize`` turns NIXL's progress thread off."""
