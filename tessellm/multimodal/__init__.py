"""Image inputs (LLaVA-style models): front-end preprocessing (HF processor), the feature
records that travel with a request, and the runner's encoder cache. docs/multimodal.md."""
