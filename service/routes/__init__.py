"""HTTP and WebSocket routes, one file per resource. Routes know HTTP and the SessionManager, nothing below."""
