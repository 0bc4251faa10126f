"""Model building blocks. Each asks the backend (through a ModelContext) for its ops."""
