"""sslscale: what each training process does (data, objectives, engine, loop, checkpoints,
metrics, evaluation). The launcher package decides where and how processes start."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sslscale")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
