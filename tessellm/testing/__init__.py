"""The backend conformance suite and its pytest plugin.

Run it against a backend (in-tree or a third-party plugin) with one command::

    python -m tessellm.testing --backend NAME            # wraps the pytest command below
    pytest -p tessellm.testing.plugin --pyargs tessellm.testing.conformance --backend NAME

``--emulate`` runs a backend whose device is absent with CPU tensors (its kernels under
TRITON_INTERPRET=1, its XLA path in eager torch); end-to-end tests then skip.
"""
