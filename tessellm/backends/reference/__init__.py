"""Pure-torch reference ops: the oracle for tests and the fallback for any backend."""
