"""Pixal3D local inference backend: model core, pipeline, export and the ZeroMQ server behind the Blender add-on."""

__version__ = "0.1.0"
