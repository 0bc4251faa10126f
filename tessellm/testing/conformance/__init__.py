"""The conformance tests (run with ``python -m tessellm.testing --backend NAME``)."""
