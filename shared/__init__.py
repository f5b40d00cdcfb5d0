"""Code that both the server and the client import: wire protocol, batch plan, schema, errors."""
