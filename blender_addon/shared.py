"""The backend modules the add-on shares: camera conventions, wire protocol and client.

They have one source, `backend/pixal3d_backend/`. `build_addon.py` copies them into the extension as the
`pixal3d_shared` package; in a repository checkout (development and tests) they are imported from the backend
package itself, which must then be on `sys.path`.
"""
try:
    from .pixal3d_shared import camera, client, protocol
except ImportError:
    from pixal3d_backend import camera, client, protocol

__all__ = ["camera", "client", "protocol"]
