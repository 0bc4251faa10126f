"""tessellm on Ray Serve: engine replicas behind an OpenAI-compatible ingress.

``serve run tessellm.entrypoints.ray_serve:build_app model=... num_replicas=2`` or a Serve
config file with ``import_path: tessellm.entrypoints.ray_serve:build_app`` (docs/ray_serve.md);
``tessellm serve --ray`` builds the same application from its flags (launch.py).

``build_app`` is loaded on first use, so importing this package (for its config, say) does not
import Ray.
"""

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from tessellm.entrypoints.ray_serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
