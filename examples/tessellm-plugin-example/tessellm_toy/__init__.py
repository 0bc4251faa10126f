"""tessellm-plugin-example: the 'toy' backend (CPU device, its own attention kernel)."""
